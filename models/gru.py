"""A small GRU ARM in Flax NNX: ``h_t = GRU(h_{t-1}, embed(y_{t-1}))``, logits ``= W h_t``.

The recurrent state is the cache of the cached-step protocol, so sampling costs O(T).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["GRU"]


class GRU(nnx.Module):
    """Causal GRU logits ``tokens [..., T] -> [..., T, A]`` (BOS = ``A`` starts the sequence).

    Args:
        num_actions: ``A``.
        dim: the embedding and hidden width.
        rngs: ``nnx.Rngs``.
    """

    def __init__(self, num_actions: int, dim: int = 32, *, rngs):
        self.num_actions = num_actions
        self.embed = nnx.Embed(num_actions + 1, dim, rngs=rngs)
        self.cell = nnx.GRUCell(dim, dim, rngs=rngs)
        self.head = nnx.Linear(dim, num_actions, rngs=rngs)

    def _read(self, hidden, ids):
        """Run the cell over ``ids [..., L]``: ``(last hidden, outputs [..., L, D])``."""

        def body(h, token):
            h, _ = self.cell(h, self.embed(token))
            return h, h

        hidden, outs = jax.lax.scan(body, hidden, jnp.moveaxis(ids, -1, 0))
        return hidden, jnp.moveaxis(outs, 0, -2)

    def _zeros(self, batch_shape):
        return jnp.zeros((*batch_shape, self.cell.hidden_features), self.embed.embedding.dtype)

    def _start(self, batch_shape, prompt):
        bos = jnp.full((*batch_shape, 1), self.num_actions, jnp.int32)
        if prompt is None:
            return bos
        prompt = jnp.broadcast_to(jnp.asarray(prompt, jnp.int32), (*batch_shape, prompt.shape[-1]))
        return jnp.concatenate([bos, prompt], axis=-1)

    def __call__(self, tokens, prompt=None):
        """Logits ``[..., T, A]``; entry t reads BOS, the prompt and ``tokens[..., :t]``."""
        tokens = jnp.asarray(tokens, jnp.int32)
        batch = tokens.shape[:-1]
        if prompt is not None:
            batch = jnp.broadcast_shapes(batch, jnp.shape(prompt)[:-1])
            tokens = jnp.broadcast_to(tokens, (*batch, tokens.shape[-1]))
        ids = jnp.concatenate([self._start(batch, prompt), tokens[..., :-1]], axis=-1)
        _, outs = self._read(self._zeros(batch), ids)
        return self.head(outs[..., -tokens.shape[-1] :, :])

    def init(self, batch_shape, prompt=None):
        """Cached protocol: read BOS and the prompt; the cache is the hidden state."""
        hidden = jnp.zeros(
            (*batch_shape, self.cell.hidden_features), self.embed.embedding[...].dtype
        )
        hidden, _ = self._read(hidden, self._start(tuple(batch_shape), prompt))
        return self.head(hidden), hidden

    def step(self, hidden, token):
        """``(next logits, next hidden)`` after reading ``token [*batch]``."""
        hidden, _ = self.cell(hidden, self.embed(token))
        return self.head(hidden), hidden
