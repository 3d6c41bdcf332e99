import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest

from seqppl.cli import main
from seqppl.train import CheckpointError


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "seqppl", *args], capture_output=True, text=True, timeout=600
    )


def test_demo_quick_writes_the_report_and_its_numbers_are_consistent(tmp_path):
    out = _run("demo", "--quick", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    exact = float(re.search(r"\| log Z \(exact, DP\) \| (\S+) \|", out.stdout).group(1))
    match = re.search(r"\| log Z \(IS, student proposal\) \| (\S+) ± (\S+) \|", out.stdout)
    estimate, stderr = float(match.group(1)), float(match.group(2))
    assert abs(estimate - exact) <= 4 * stderr
    assert "100% of 4,096 samples valid" in out.stdout
    kl = {
        name: float(re.search(rf"\| KL\({name} ‖ target\) \| (\S+) \|", out.stdout).group(1))
        for name in ("constrained decoder", "student")
    }
    assert kl["student"] < kl["constrained decoder"]
    bound = float(re.search(r"\| bound 2T·ε \(student\) \| (\S+) \|", out.stdout).group(1))
    assert kl["student"] <= bound
    report = (tmp_path / "report.md").read_text()
    assert "Per-position KL" in report and "| quantity | value |" in report
    for name in ("distillation.png", "is_weights.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    import xarray as xr

    tree = xr.open_datatree(tmp_path / "student_report.nc", engine="h5netcdf")
    assert tree.attrs["kl_reverse"] == pytest.approx(kl["student"], abs=1e-4)
    assert tree["per_position"]["kl"].size == 7


def test_logz_of_a_model_file_and_of_a_named_model(tmp_path, capsys):
    model = tmp_path / "model.py"
    model.write_text(
        "import jax.numpy as jnp\nimport seqppl as sp\n"
        "space = sp.SequenceSpace(3, 4, eos=True)\n"
        "def target():\n"
        "    return sp.EBM(lambda y: -0.5 * jnp.sum(y == 1, -1).astype(float), space)\n"
    )
    assert main(["logz", str(model), "--method", "is", "--num-samples", "20000"]) == 0
    text = capsys.readouterr().out
    assert "uniform policy" in text
    assert abs(float(re.search(r"/ stderr = (\S+)", text).group(1))) < 4
    assert main(["logz", str(model)]) == 0 and "(exact)" in capsys.readouterr().out
    assert main(["logz", "digit-sum-repetition", "--num-samples", "5000"]) == 0
    text = capsys.readouterr().out
    assert "k-hat" in text and "exact log Z" not in text


def test_info_prints_versions():
    out = _run("info")
    assert out.returncode == 0 and "jax" in out.stdout and "devices" in out.stdout


def test_bad_arguments_exit_nonzero_with_one_line(tmp_path, capsys):
    """In-process (the parser's exit); one subprocess checks the real entry point."""
    out = _run("nope")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    blocked = tmp_path / "file"
    blocked.write_text("")
    bad_model = tmp_path / "bad.py"
    bad_model.write_text("def target():\n    return 3\n")
    for args in (
        ["demo", "--seed", "-1"],
        ["demo", "--seed", "x"],
        ["demo", "--quick", "--out", str(blocked / "sub")],
        ["reproduce", "--steps", "-1"],
        ["reproduce", "--config", "v99"],
        ["logz", "no-such-model"],
        ["logz", str(bad_model)],
        ["logz", "digit-sum", "--num-samples", "0"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        assert exit_.value.code == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("seqppl"), (args, lines)


def test_reproduce_passes_its_arguments_and_prints_the_summary(tmp_path, capsys):
    """The run itself (metrics.csv, panels.png, kl ≤ bound) is tested through
    examples/paper_reproduction.py; here the command line's wiring, in-process."""
    calls = []

    def fake_reproduce(config, target, steps, lr, seed, out, log_every, zipf_order, adam_b2):
        calls.append((config, target, steps, lr, seed, out, log_every, zipf_order, adam_b2))
        (out / "summary.md").write_text("kl ≤ bound at every logged step: True\n")
        return {"step": np.arange(3)}

    with mock.patch("seqppl.models.paper.reproduce", fake_reproduce):
        argv = ["reproduce", "--config", "v4t8-n3", "--target", "normal", "--steps", "7"]
        argv += ["--lr", "0.5", "--seed", "3", "--log-every", "2", "--out", str(tmp_path)]
        assert main([*argv, "--zipf-order", "lexicographic", "--adam-b2", "0.99"]) == 0
    assert calls == [("v4t8-n3", "normal", 7, 0.5, 3, tmp_path, 2, "lexicographic", 0.99)]
    assert "kl ≤ bound at every logged step: True" in capsys.readouterr().out


def test_reproduce_reports_checkpoint_errors_and_interruptions(tmp_path, capsys):
    """Checkpoints of other settings under OUT: one usage line (exit 2); Ctrl-C: how to resume
    (exit 130). The resuming itself is tested on `reproduce` (test_models.py)."""

    def refuse(*args, **kwargs):
        raise CheckpointError("out='x' holds checkpoints of a run with other settings")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    argv = ["reproduce", "--out", str(tmp_path)]
    with mock.patch("seqppl.models.paper.reproduce", refuse), pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert "other settings" in capsys.readouterr().err.strip().splitlines()[-1]
    with mock.patch("seqppl.models.paper.reproduce", interrupt):
        assert main(argv) == 130
    assert f"resume from {tmp_path / 'checkpoints'}" in capsys.readouterr().err


def test_reproduce_bad_arguments(capsys):
    bad = (["--steps", "-1"], ["--config", "nope"], ["--out", "/proc/nope"], ["--lr", "0"])
    for args in (*bad, ["--adam-b2", "1"], ["--adam-b2", "0"]):
        with pytest.raises(SystemExit) as exit_:
            main(["reproduce", *args])
        assert exit_.value.code == 2, args
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("seqppl")
