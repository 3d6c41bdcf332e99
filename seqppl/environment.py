"""What seqppl runs on: the versions of its dependencies, the JAX backend, devices and precision.

``seqppl info`` prints ``environment()``; attach it to a bug report or a benchmark's results.
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version

__all__ = ["environment", "DEPENDENCIES", "OPTIONAL_DEPENDENCIES"]

DEPENDENCIES = (
    "jax",
    "jaxlib",
    "numpyro",
    "flax",
    "optax",
    "arviz",
    "arviz-base",
    "arviz-stats",
    "matplotlib",
    "tqdm",
    "h5netcdf",
    "h5py",
    "numpy",
    "xarray",
    "outlines-core",
    "tokenizers",
)
"""The distributions seqppl installs with, whose versions ``environment`` reports."""
OPTIONAL_DEPENDENCIES = ("funsor",)
"""The ``bench`` extra's peers, reported as ``"not installed"`` when absent."""


def environment() -> list[tuple[str, str]]:
    """``[(name, value)]``: seqppl, Python, each dependency's installed version, the JAX backend,
    its devices and whether float64 is enabled."""
    import jax

    import seqppl

    rows = [("seqppl", seqppl.__version__), ("python", sys.version.split()[0])]
    for name in (*DEPENDENCIES, *OPTIONAL_DEPENDENCIES):
        try:
            rows.append((name, version(name)))
        except PackageNotFoundError:
            rows.append((name, "not installed"))
    rows.append(("backend", jax.default_backend()))
    rows.append(("devices", ", ".join(str(d) for d in jax.devices())))
    rows.append(("float64", "enabled" if jax.config.jax_enable_x64 else "disabled"))
    return rows
