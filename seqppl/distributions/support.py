"""The support of a sequence distribution: well-formed token arrays of a ``SequenceSpace``.

A NumPyro constraint with ``is_discrete = True`` and ``event_dim = 1``: every id in the action
set and, with EOS, every entry after the first EOS is EOS and the last entry is EOS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from numpyro.distributions import constraints

from seqppl.space import SequenceSpace

__all__ = ["SequenceSupport", "checked_prompt", "enumerate_sequences"]


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
