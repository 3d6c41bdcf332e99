"""Data parallelism over a ``jax.sharding.Mesh``: split the batch axis over every device.

The estimators and ``fit`` take ``mesh=``: the arrays they build with a leading batch axis
(importance-sampling draws, SMC replicates, minibatches, exact-risk chunks) are constrained to
``NamedSharding(mesh, P(mesh.axis_names))`` (the batch axis over all mesh axes at once), the
parameters are replicated, and XLA's SPMD partitioner splits the work that makes them (the
sampling scans and network passes run on each device's shard) and adds the reductions. Random
draws do not depend on the sharding (jax's partitionable threefry, on by default), so a sharded
run gives the single-device result up to the order of floating-point sums.

Several processes (docs/partition.md#several-processes): call ``jax.distributed.initialize()``
on every process first (``seqppl.processes.initialize``), then build the mesh over
``jax.devices()`` (every process's devices, ``global_mesh``); give every process the same
arguments and key. Each process computes only its devices' shards; results reach every process
through ``to_host`` / ``to_local`` (an all-gather inside one XLA program when a shard lives in
another process, a local read when the value is replicated), and files are written by
``is_lead_process`` alone.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = [
    "batch_sharding",
    "shard_batch",
    "replicate",
    "to_host",
    "to_local",
    "global_mesh",
    "spans_processes",
    "is_lead_process",
]


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
    """Outside ``jit``: ``tree`` copied to every device of ``mesh`` (unchanged for None). On a
    mesh over several processes every process must pass the same values (jax does not check)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def to_host(x) -> np.ndarray:
    """A NumPy copy of ``x`` on this process: read locally when ``x`` is fully addressable or
    replicated, else all-gathered from the other processes (every process must call it)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def to_local(tree):
    """``tree`` with every array that spans other processes replaced by a copy on this
    process's default device (``to_host``): usable without a mesh afterwards."""

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return jnp.asarray(to_host(x))
        return x

    return jax.tree.map(one, tree)


def global_mesh(axis_name: str = "batch") -> Mesh:
    """A one-axis ``Mesh`` over ``jax.devices()``: every device of every process (after
    ``jax.distributed.initialize``), grouped by process."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (axis_name,))


def spans_processes(mesh: Mesh | None) -> bool:
    """Whether ``mesh`` has devices of more than one process."""
    return mesh is not None and len({d.process_index for d in mesh.devices.flat}) > 1


def is_lead_process(mesh: Mesh | None) -> bool:
    """Whether this process writes the run's files: True without a mesh or when this process
    holds ``mesh``'s first device (process 0 of a ``global_mesh``)."""
    return mesh is None or jax.process_index() == mesh.devices.flat[0].process_index
