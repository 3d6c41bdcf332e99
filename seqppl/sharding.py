"""Data parallelism over a ``jax.sharding.Mesh``: split the batch axis over every device.

The estimators and ``fit`` take ``mesh=``: the arrays they build with a leading batch axis
(importance-sampling draws, SMC replicates, minibatches, exact-risk chunks) are constrained to
``NamedSharding(mesh, P(mesh.axis_names))`` (the batch axis over all mesh axes at once), the
parameters are replicated, and XLA's SPMD partitioner splits the work that makes them (the
sampling scans and network passes run on each device's shard) and adds the reductions. Random
draws do not depend on the sharding (jax's partitionable threefry, on by default), so a sharded
run gives the single-device result up to the order of floating-point sums.

Multi-host: call ``jax.distributed.initialize()`` on every process first, then build the mesh
over ``jax.devices()`` (every process's devices); give every process the same arguments and key.
Results come back to each host with ``to_host`` (an all-gather when a shard lives elsewhere).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["batch_sharding", "shard_batch", "replicate", "to_host"]


def batch_sharding(mesh: Mesh, axis: int = 0) -> NamedSharding:
    """Axis ``axis`` split over all of ``mesh``'s axes, the others replicated."""
    return NamedSharding(mesh, PartitionSpec(*([None] * axis), mesh.axis_names))


def shard_batch(tree, mesh: Mesh | None, axis: int = 0):
    """Inside ``jit``: every array of ``tree`` with axis ``axis`` split over ``mesh`` (a no-op
    for ``mesh=None``). Uneven sizes are allowed (XLA pads the last shard)."""
    if mesh is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, batch_sharding(mesh, axis))


def replicate(tree, mesh: Mesh | None):
    """Outside ``jit``: ``tree`` copied to every device of ``mesh`` (unchanged for None)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def to_host(x) -> np.ndarray:
    """A NumPy copy of ``x``, gathered from the other hosts when it is not fully addressable."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)
