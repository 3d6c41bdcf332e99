"""Each benchmark script runs tiny (its own equality assertions included).

Slow-marked (``make test-all``): the scripts measure the library rather than define it, and
their start-up and compilation cost about a minute and a half of ``make test``'s budget.
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


def test_run_gpu_refuses_without_a_gpu():
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "run_gpu.sh"
    env = {**os.environ, "PYTHON": sys.executable, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "no GPU" in out.stderr, out.stderr
