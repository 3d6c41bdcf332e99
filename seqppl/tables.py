"""Tables on a lattice: validation, rank normalisation and the one gather (layer 2).

A table of local rewards or logits on a lattice of ``S`` states over ``A`` actions is ``[S, A]``
(the same at every decision), ``[T, S, A]``, or a batch of tables ``[*B, T, S, A]`` whose batch
``B`` broadcasts against the batch of the token arrays it scores. Every read of a table goes
through one gather, ``table[b, t, s, a]`` by flat index, with plain indexing for the unbatched
ranks. Lattices are used by duck typing (``space``, ``num_states``, ``delta``,
``initial_state``), so this module sits beside ``lattice`` and below it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.checks import refuse_invalid

__all__ = [
    "check_table",
    "check_reachable",
    "table_batch_shape",
    "per_decision",
    "path_rows",
    "path_entries",
    "step_rows",
]


def check_table(lat, table, name: str = "table", *, batched: bool = False) -> jax.Array:
    """``table`` as a float array on ``lat``: ``[S, A]`` or ``[T, S, A]`` (with ``batched``, also
    ``[*B, T, S, A]``); integer tables become the default float dtype.

    Raises:
        ValueError: another shape, or (when concrete) NaN or +∞ entries; −∞ is a hard constraint.
    """
    table = jnp.asarray(table)
    if not jnp.issubdtype(table.dtype, jnp.floating):
        table = table.astype(jnp.result_type(float))
    S, A, T = lat.num_states, lat.space.num_actions, lat.space.horizon
    if table.shape not in ((S, A), (T, S, A)) and not (
        batched and table.ndim > 3 and table.shape[-3:] == (T, S, A)
    ):
        shapes = f"[{S}, {A}] or [{T}, {S}, {A}]"
        shapes += f" or [*batch, {T}, {S}, {A}]" if batched else ""
        raise ValueError(f"{name} must have shape {shapes}, got {table.shape}")
    refuse_invalid(table, name)
    return table


def table_batch_shape(table) -> tuple[int, ...]:
    """``B`` of a batch of tables ``[*B, T, S, A]``; ``()`` for ``[S, A]`` and ``[T, S, A]``."""
    shape = jnp.shape(table)
    return tuple(shape[:-3]) if len(shape) > 3 else ()


def per_decision(table, horizon: int) -> jax.Array:
    """``[*B, T, S, A]`` from any rank: an ``[S, A]`` table broadcast over the ``T`` decisions."""
    table = jnp.asarray(table)
    return table if table.ndim > 2 else jnp.broadcast_to(table, (horizon, *table.shape))


def path_rows(table, states) -> jax.Array:
    """Rows ``table[t, s_t, :]`` along paths: float ``[..., T, A]`` for states int ``[..., T]``."""
    table = jnp.asarray(table)
    if table.ndim == 2:
        return table[states]
    T, S, A = table.shape[-3:]
    if table.ndim == 3:
        return table[jnp.arange(T), states]
    rows = _positions(states) * S + states  # row (t, s_t) of the [*B, T·S, A] view
    return _take(table.reshape(*table.shape[:-3], T * S, A), rows)


def path_entries(table, states, actions) -> jax.Array:
    """Entries ``table[t, s_t, a_t]`` along paths: float ``[..., T]`` for states and actions int
    ``[..., T]`` (no ``[..., T, A]`` row is materialised)."""
    table = jnp.asarray(table)
    if table.ndim == 2:
        return table[states, actions]
    T, S, A = table.shape[-3:]
    if table.ndim == 3:
        return table[jnp.arange(T), states, actions]
    flat = (_positions(states) * S + states) * A + actions
    return _take(table.reshape(*table.shape[:-3], T * S * A, 1), flat)[..., 0]


def step_rows(table, states, t) -> jax.Array:
    """Rows ``table[t, s, :]`` of one decision ``t``: float ``[*shape, A]`` for states int
    ``[*shape]`` (a batch ``B`` of tables trails ``shape``); ``[S, A]`` tables ignore ``t``."""
    table = jnp.asarray(table)
    if table.ndim == 2:
        return table[states]
    if table.ndim == 3:
        return table[t][states]
    at_t = jnp.take(table, t, axis=-3)  # [*B, S, A]
    return _take(at_t, states[..., None])[..., 0, :]


def _positions(states) -> jax.Array:
    """The decision index ``t`` of every entry of ``states [..., T]``."""
    return jnp.broadcast_to(jnp.arange(states.shape[-1]), states.shape)


def _take(table, index) -> jax.Array:
    """``table [*B, N, W]`` read at ``index [..., K]`` along ``N``: ``[..., K, W]``, with ``B``
    aligned to the dimensions just before ``K`` (broadcast against them)."""
    batch = table.shape[:-2]
    lead = jnp.broadcast_shapes(index.shape[:-1], batch)
    table = table.reshape((1,) * (len(lead) - len(batch)) + table.shape)
    index = jnp.broadcast_to(index, (*lead, index.shape[-1]))
    return jnp.take_along_axis(table, index[..., None], axis=-2)


def check_reachable(lat, q, prompt=None) -> None:
    """Refuses logits ``q`` where a state reachable from ``prompt`` has no finite allowed action
    (such a table is not a distribution; see docs/theory.md#dead-ends). Skipped when traced.

    Args:
        lat: the lattice.
        q: float ``[S, A]``, ``[T, S, A]`` or ``[*B, T, S, A]`` (each entry from its own prompt).
        prompt: None or an already validated int ``[*B', P]``.

    Raises:
        ValueError: naming the decision ``t`` and state ``s``.
    """
    if isinstance(q, jax.core.Tracer) or isinstance(prompt, jax.core.Tracer):
        return
    space = lat.space
    starts = np.asarray(lat.initial_state(prompt, trusted=True))
    full = np.asarray(space.mask_logits(per_decision(q, space.horizon), table=True))
    if full.ndim == 3:  # one table: reachability from every prompt's start at once
        _check_reachable_from(lat, full, starts.ravel())
        return
    batch = np.broadcast_shapes(full.shape[:-3], starts.shape)
    full = np.broadcast_to(full, (*batch, *full.shape[-3:]))
    starts = np.broadcast_to(starts, batch)
    for index in np.ndindex(*batch):
        _check_reachable_from(lat, full[index], starts[index].ravel())


def _check_reachable_from(lat, full: np.ndarray, starts: np.ndarray) -> None:
    """The dead-end check of one masked ``[T, S, A]`` table from the states ``starts``."""
    continues = lat.space.continuing_actions()
    reach = np.zeros(lat.num_states, dtype=bool)
    reach[starts] = True
    for t in range(full.shape[0]):
        finite = np.isfinite(full[t])
        dead = reach & ~finite.any(axis=1)
        if dead.any():
            s = int(np.argmax(dead))
            raise ValueError(
                f"q[{t}, {s}, :] has no finite logit, but state {s} is reachable at decision "
                f"{t}: such a table is not a distribution (a dead end)"
            )
        moves = finite & reach[:, None] & continues[None, :]
        reach = np.zeros_like(reach)
        reach[lat.delta[moves]] = True
