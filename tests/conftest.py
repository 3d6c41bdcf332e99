"""Test configuration: float64 available, rank promotion raises, hypothesis profiles, and one
persistent compilation cache for the whole session.

x64 is enabled so that float64 cases can run; float32 cases build float32 arrays explicitly and
check that the library keeps that dtype. The two pytest workers and the example and CLI
subprocesses compile many of the same programs (the demo and the lookahead example distil the
same student); JAX's persistent cache, in ``.pytest_cache/jax`` (set through the environment
before JAX is imported, so subprocesses inherit it), compiles each once. It changes no result:
a cached executable is the one XLA would compile again. Most programs of the suite run once, on
tiny inputs, so compiling them dominates: ``JAX_DISABLE_MOST_OPTIMIZATIONS`` (JAX's switch for
"the cost of optimization is greater than that of running a less-optimized program") makes XLA
skip its expensive passes. Timing checks (tests/test_benchmarks.py) run their subprocesses with
the optimisations back on.
"""

import os
from pathlib import Path

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax")
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")

settings.register_profile(  # make test: keeps the suite within its time budget
    "ci",
    max_examples=10,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(  # make test-all
    "full",
    max_examples=50,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
