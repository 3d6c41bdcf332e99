"""The support of a sequence distribution: well-formed token arrays of a ``SequenceSpace``.

A NumPyro constraint with ``is_discrete = True`` and ``event_dim = 1``: every id in the action
set and, with EOS, every entry after the first EOS is EOS and the last entry is EOS.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from numpyro.distributions import Distribution, constraints

from seqppl.sharding import shard_batch
from seqppl.space import SequenceSpace
from seqppl.tables import table_batch_shape

__all__ = [
    "SequenceDistribution",
    "SequenceSupport",
    "batch_shape_of",
    "checked_prompt",
    "enumerate_sequences",
    "map_over_batch",
]


class SequenceDistribution(Distribution):
    """NumPyro's ``Distribution`` with its pytree fields in sorted order, the base of ``ARM`` and
    ``EBM``. NumPyro gathers the fields into a set, whose order follows string hashing
    (``PYTHONHASHSEED``): without this, one model's leaves would come in another order in each
    process of a jax.distributed job and in a restarted run (checkpoint fingerprints, which
    digest the leaves by position, and compilation-cache keys would differ)."""

    @classmethod
    def gather_pytree_data_fields(cls) -> tuple[str, ...]:
        """NumPyro's data (leaf) fields, sorted."""
        return tuple(sorted(super().gather_pytree_data_fields()))

    @classmethod
    def gather_pytree_aux_fields(cls) -> tuple[str, ...]:
        """NumPyro's auxiliary (static) fields, sorted."""
        return tuple(sorted(super().gather_pytree_aux_fields()))


class SequenceSupport(constraints.Constraint):
    """``check(y)`` is bool ``[...]`` for tokens ``[..., T]``: is ``y`` a sequence of ``space``.

    Example:
        >>> import jax.numpy as jnp
        >>> support = SequenceSupport(SequenceSpace(vocab_size=2, length=2, eos=True))
        >>> support(jnp.array([[0, 2, 2], [2, 0, 2], [0, 1, 1]])).tolist()
        [True, False, False]
    """

    is_discrete = True
    event_dim = 1

    def __init__(self, space: SequenceSpace):
        self.space = space

    def __call__(self, x):
        space = self.space
        x = jnp.asarray(x)
        ok = ((x >= 0) & (x < space.num_actions)).all(-1)
        if x.shape[-1] != space.horizon:
            return jnp.zeros(x.shape[:-1], bool)
        if space.eos:
            is_eos = x == space.eos_id
            ok &= (space.active(x) | is_eos).all(-1) & is_eos[..., -1]
        return ok

    def feasible_like(self, prototype):
        """An always-valid sequence array (all EOS, or all 0) shaped like ``prototype``."""
        fill = self.space.eos_id if self.space.eos else 0
        return jnp.full(jnp.shape(prototype), fill, jnp.int32)

    def tree_flatten(self):
        """No array leaves: the space is static."""
        return (), ((), {"space": self.space})

    def eq(self, other, static: bool = False):
        """Equal when the other support is over the same space."""
        return isinstance(other, SequenceSupport) and other.space == self.space

    def __repr__(self) -> str:
        return f"SequenceSupport({self.space})"


def enumerate_sequences(space: SequenceSpace, batch_shape=(), expand: bool = True):
    """Every sequence of ``space`` as ``[N, *batch_shape, T]`` (``[N, 1.., T]`` unexpanded)."""
    seqs = jnp.asarray(space.enumerate())
    shape = (seqs.shape[0],) + (1,) * len(batch_shape) + (space.horizon,)
    seqs = seqs.reshape(shape)
    return jnp.broadcast_to(seqs, (shape[0], *batch_shape, shape[-1])) if expand else seqs


def checked_prompt(space: SequenceSpace, prompt):
    """A distribution's prompt as int32 ``[*batch, P]`` (validated when concrete), or None.

    Raises:
        TypeError: ``space`` is not a ``SequenceSpace``.
        ValueError: the prompt holds ids outside the vocabulary.
    """
    if not isinstance(space, SequenceSpace):
        raise TypeError(f"space must be a SequenceSpace, got {type(space).__name__}")
    if prompt is None:
        return None
    if not isinstance(prompt, jax.core.Tracer):
        space.validate_prompt(prompt)
    return jnp.asarray(prompt, jnp.int32)


def batch_shape_of(table=None, prompt=None, *more) -> tuple[int, ...]:
    """The broadcast batch shape of a lattice table (``[*B, T, S, A]``; ``[S, A]`` and
    ``[T, S, A]`` have none), a prompt ``[*B, P]`` and further batch shapes."""
    shapes = [() if table is None else table_batch_shape(table)]
    shapes.append(() if prompt is None else tuple(jnp.shape(prompt)[:-1]))
    return tuple(jnp.broadcast_shapes(*shapes, *more))


def map_over_batch(fn, batch_shape, table, prompt):
    """``fn(table_b, prompt_b)`` for every entry ``b`` of ``batch_shape``, stacked ``[*batch, …]``.

    ``table`` (``[S, A]``, ``[T, S, A]`` shared by all entries, or ``[*B, T, S, A]``) and
    ``prompt`` (None or ``[*B', P]``) broadcast to ``batch_shape``; ``fn`` sees one table and one
    prompt ``[P]`` (or None). One ``vmap`` over the flattened batch.
    """
    if not batch_shape:
        return fn(table, prompt)
    size = math.prod(batch_shape)
    table = jnp.asarray(table)
    table_axis = None
    if table.ndim > 3:
        event = table.shape[-3:]
        table = jnp.broadcast_to(table, (*batch_shape, *event)).reshape(size, *event)
        table_axis = 0
    prompt_axis = None
    if prompt is not None:
        prompt = jnp.broadcast_to(prompt, (*batch_shape, prompt.shape[-1])).reshape(size, -1)
        prompt_axis = 0
    out = jax.vmap(fn, in_axes=(table_axis, prompt_axis))(table, prompt)
    return jax.tree.map(lambda x: x.reshape(*batch_shape, *x.shape[1:]), out)


def map_in_chunks(fn, tokens, chunk_size: int, mesh=None):
    """``fn(tokens)`` for tokens ``[N, T]`` evaluated ``chunk_size`` rows at a time (bounded
    memory; one ``lax.map``), outputs (a pytree of ``[N, …]`` arrays) concatenated; with a
    ``mesh`` each chunk's rows are split over its devices (``seqppl.sharding``).

    The last chunk is padded with copies of the first row, whose outputs are dropped.
    """
    tokens = jnp.asarray(tokens)
    n = tokens.shape[0]
    chunk_size = min(chunk_size, n)
    chunks = -(-n // chunk_size)
    padded = jnp.concatenate(
        [tokens, jnp.broadcast_to(tokens[:1], (chunks * chunk_size - n, *tokens.shape[1:]))]
    )
    out = jax.lax.map(
        lambda block: fn(shard_batch(block, mesh)),
        padded.reshape(chunks, chunk_size, *tokens.shape[1:]),
    )
    return jax.tree.map(lambda x: x.reshape(chunks * chunk_size, *x.shape[2:])[:n], out)
