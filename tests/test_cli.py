import argparse
import re
import runpy
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import pytest

import seqppl as sp
from seqppl.cli import build_parser, main
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


# A model file with both parts, so that the CLI and the Python call use the same proposal.
_MODEL = (
    "import jax.numpy as jnp\nimport seqppl as sp\n"
    "space = sp.SequenceSpace(3, 4, eos=True)\n"
    "lattice = sp.Lattice.markov(space, 1)\n"
    "def target():\n"
    "    return sp.EBM(lambda y: -0.5 * jnp.sum(y == 1, -1).astype(float), space)\n"
    "def proposal():\n"
    "    return sp.ARM.from_table(lattice, jnp.zeros((lattice.num_states, space.num_actions)))\n"
)


def _python_estimate(path, method, num_samples, key):
    model = runpy.run_path(str(path))
    return sp.log_partition(model["target"](), method, model["proposal"](), num_samples, key)


def test_logz_smc_num_samples_is_the_python_total(tmp_path, capsys):
    """--num-samples is sp.log_partition's num_samples (particles over all replicates), so the
    CLI prints the Python estimate for the same seed; below Python's minimum (2 particles in
    each of 16 replicates) the error names the user's option and value."""
    model = tmp_path / "model.py"
    model.write_text(_MODEL)
    argv = ["logz", str(model), "--method", "smc", "--num-samples", "512", "--seed", "1"]
    assert main(argv) == 0
    expected = _python_estimate(model, "smc", 512, jax.random.key(1))
    assert expected.num_samples == 512
    assert str(expected) in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["logz", str(model), "--method", "smc", "--num-samples", "20"])
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--num-samples 20" in line and "32" in line and "num_samples=" not in line


def test_logz_seed_builds_the_key_of_the_python_api(tmp_path, capsys):
    """--seed n is jax.random.PRNGKey(n) (equivalently jax.random.key(n)) in the Python call."""
    model = tmp_path / "model.py"
    model.write_text(_MODEL)
    assert main(["logz", str(model), "--method", "is", "--num-samples", "300", "--seed", "3"]) == 0
    expected = _python_estimate(model, "is", 300, jax.random.PRNGKey(3))
    assert str(expected) in capsys.readouterr().out


def _options():
    """(subcommand, action) for every option of the top-level parser and each subcommand."""
    parser = build_parser()
    (sub,) = (a for a in parser._actions if isinstance(a.choices, dict))  # the subcommands
    for name, command in [("seqppl", parser), *sub.choices.items()]:
        for action in command._actions:
            if action.dest != "help":
                yield name, action


def test_every_option_says_what_it_does_and_its_default():
    options = list(_options())
    names = {"seqppl", "demo", "logz", "reproduce", "distortion"}
    assert {name for name, _ in options} == names  # info: -h only
    for name, action in options:
        where = (name, action.option_strings or action.dest)
        assert action.help and len(action.help.split()) >= 3, where
        flag = action.nargs == 0 and action.const is True  # store_true: False means absent
        if action.default is not None and not flag and action.default != argparse.SUPPRESS:
            assert f"(default: {action.default})" in action.help, where


def test_top_level_help_starts_with_a_plain_sentence(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    description = capsys.readouterr().out.split("\n\n")[1]
    first = description.split(". ")[0]
    assert first and not re.search(r"[`*§]|THEORY", description), description
    assert description.rstrip().endswith("."), description


def test_info_lists_every_dependency_and_the_devices(capsys):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    for name in ("seqppl", "python", "jax", "jaxlib", "numpyro", "flax", "optax", "arviz"):
        assert re.search(rf"^{name}\b", text, re.M), name
    for name in ("arviz-base", "arviz-stats", "matplotlib", "tqdm", "h5netcdf", "numpy"):
        assert re.search(rf"^{name}\b", text, re.M), name
    for name in ("outlines-core", "tokenizers"):  # the constraint compiler and tokenizers
        assert re.search(rf"^{name}\s+\d", text, re.M), name
    assert re.search(r"^funsor\s+(\d|not installed)", text, re.M)  # the bench extra
    assert re.search(r"^backend\s+\w+", text, re.M) and "devices" in text


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
        ["distortion", "--seed", "-1"],
        ["distortion", "--quick", "--out", str(blocked / "sub")],
        ["reproduce", "--steps", "-1"],
        ["reproduce", "--config", "v99"],
        ["logz", "no-such-model"],
        ["logz", str(bad_model)],
        ["logz", "digit-sum", "--num-samples", "0"],
        ["logz", "digit-sum", "--method", "is", "--num-samples", "1"],
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
