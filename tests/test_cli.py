import re
import subprocess
import sys

import numpy as np


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "seqppl", *args], capture_output=True, text=True, timeout=600
    )


def test_demo_quick_reports_matching_log_z():
    out = _run("demo", "--quick")
    assert out.returncode == 0, out.stderr
    dp = float(re.search(r"dynamic programming : *(\S+)", out.stdout).group(1))
    brute = float(re.search(r"enumeration *: *(\S+)", out.stdout).group(1))
    assert abs(dp - brute) < 1e-5
    prob = float(re.search(r"under the bigram = (\S+)", out.stdout).group(1))
    assert abs(prob - np.exp(dp)) < 1e-4
    assert "same support True" in out.stdout


def test_info_prints_versions():
    out = _run("info")
    assert out.returncode == 0 and "jax" in out.stdout and "devices" in out.stdout


def test_bad_arguments_exit_nonzero_with_one_line():
    for args in (["demo", "--seed", "-1"], ["demo", "--seed", "x"], ["nope"]):
        out = _run(*args)
        assert out.returncode == 2
        assert "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("seqppl")


def test_reproduce_tiny_run_writes_metrics_plots_and_summary(tmp_path):
    out = _run("reproduce", "--steps", "12", "--log-every", "4", "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,arm_gap,ebm_gap,before_map,after_map,kl,bound"
    rows = np.array([[float(v) for v in line.split(",")] for line in lines[1:]])
    assert rows[:, 0].tolist() == [0, 4, 8, 11]
    assert np.all(rows[:, 1:3] > -1e-4)  # risks are at least the entropy
    assert np.all(rows[:, 5] <= rows[:, 6])  # kl <= 2T * after-map distance
    np.testing.assert_allclose(rows[:, 6], 2 * 4 * rows[:, 4], rtol=1e-4)
    assert (tmp_path / "panels.png").stat().st_size > 0
    assert "kl ≤ bound at every logged step: True" in out.stdout


def test_reproduce_bad_arguments():
    for args in (["--steps", "-1"], ["--config", "nope"], ["--out", "/proc/nope"], ["--lr", "0"]):
        out = _run("reproduce", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("seqppl")
