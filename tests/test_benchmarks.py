"""Each benchmark script runs tiny (its own equality assertions included), and the overhead
guard: seqppl within 2× of plain ``jnp`` on every row of bench_overhead.py at small sizes.

The tiny runs are slow-marked (``make test-all``): the scripts measure the library rather than
define it, and their start-up and compilation cost about a minute and a half of ``make test``'s
budget. The guard runs in ``make test`` (about 20 s), so that an overhead cannot creep back
unnoticed; the full figures are ``make bench``'s.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "benchmarks").glob("bench_*.py"))
OPTIMISED = {k: v for k, v in os.environ.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
"""The environment with XLA's optimisations back on (conftest turns them off for the suite)."""


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_runs_tiny(script):
    out = subprocess.run(
        [sys.executable, str(script), "--tiny", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=600,
        env=OPTIMISED,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "|---|" in out.stdout, "each benchmark prints a markdown table"


def test_no_overhead_crept_back_over_plain_jnp():
    """Every piece of work of bench_overhead.py (log Z, M, occupancy, log_prob, sampling, an IS
    chunk) at V = 48, T = 24 within 2× of the plain-jnp reference timed beside it (the full-size
    ratios, all ≤ 1.1, are in benchmarks/RESULTS.md)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_overhead.py"
    out = subprocess.run(
        [sys.executable, str(script), "--small", "--repeats", "15", "--max-ratio", "2"],
        capture_output=True,
        text=True,
        timeout=600,
        env=OPTIMISED,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("|") > 14 * 5, "one row per piece of work"


def test_run_gpu_refuses_without_a_gpu():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "no GPU" in out.stderr, out.stderr
