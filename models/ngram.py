"""A trainable n-gram ARM in Flax NNX: a logits table on ``Lattice.markov(space, order)``.

Because the table lives on a lattice, everything exact applies: ``exact_arm(model)`` is the
``ARM.from_table`` twin (exact entropy, ``to_ebm`` by M⁻¹ on the table), and it trains with
``ARM.from_nnx`` like any network, or with NumPyro priors through ``nnx_arm(..., prior=...)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import seqppl as sp

__all__ = ["NGram", "exact_arm"]


class NGram(nnx.Module):
    """Logits ``q[s_t, ·]`` with ``s_t`` the last ``order`` tokens (start-padded).

    Args:
        space: the ``SequenceSpace``.
        order: the context length ``k`` (``order=1``: a bigram).
        rngs: ``nnx.Rngs``; the table starts at ``init_scale · N(0, 1)``.
        init_scale: scale of the initial logits.
    """

    def __init__(self, space: sp.SequenceSpace, order: int = 1, *, rngs, init_scale=0.1):
        self.lattice = sp.Lattice.markov(space, order)  # static: not a Param
        shape = (self.lattice.num_states, space.num_actions)
        self.table = nnx.Param(init_scale * jax.random.normal(rngs.params(), shape))

    def __call__(self, tokens, prompt=None):
        """Logits ``[..., T, A]`` along ``tokens [..., T]``."""
        states = self.lattice.states(jnp.asarray(tokens), prompt)
        return self.table[...][states]

    def init(self, batch_shape, prompt=None):
        """Cached protocol: the state is the lattice state."""
        start = jnp.broadcast_to(self.lattice.initial_state(prompt), batch_shape)
        return self.table[...][start], start

    def step(self, state, token):
        """``(logits of the next decision, next state)``."""
        state = jnp.asarray(self.lattice.delta)[state, token]
        return self.table[...][state], state


def exact_arm(model: NGram, prompt=None, params=None) -> sp.ARM:
    """The table ARM of an ``NGram`` (``params``: a pure dict as in ``ARM.from_nnx``)."""
    table = model.table[...] if params is None else params["table"]
    return sp.ARM.from_table(model.lattice, table, prompt)
