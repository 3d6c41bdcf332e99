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
