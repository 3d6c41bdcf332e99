"""The paper's Transformers in Flax NNX (THEORY §5): a causal ARM with a key/value cache, and a
bidirectional EBM.

Block (pre-LayerNorm): ``x ← x + Attn(LN(x))``, ``x ← x + W₂ ReLU(W₁ LN(x))``; learned
positional embeddings; no final LayerNorm. The input embedding has ``A + 1`` rows (the ``A``
actions and BOS = ``A``); the ARM's head has ``A`` outputs (BOS is never predicted), the EBM's
head one scalar after a mean over positions. Sizes: ``N`` blocks, ``H`` heads, width ``D``,
MLP width ``F``.

Token layout: position 0 holds BOS, then the prompt (if any), then the response. The ARM scores
decision t from positions ``0 .. P + t``; ``max_len`` is the number of positions (``1 + P + T``
for the EBM, ``P + T`` for the ARM, which never reads its last token).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = ["Block", "TransformerARM", "TransformerEBM"]


class Block(nnx.Module):
    """One pre-LayerNorm block with biased fused QKV and output projections.

    ``__call__(x [..., L, D], mask [L, L] | None)``; ``attend_cached`` for one new position.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        kw = {"rngs": rngs, "dtype": dtype, "param_dtype": dtype}
        self.ln_attn = nnx.LayerNorm(dim, **kw)
        self.qkv = nnx.Linear(dim, 3 * dim, **kw)
        self.out = nnx.Linear(dim, dim, **kw)
        self.ln_mlp = nnx.LayerNorm(dim, **kw)
        self.up = nnx.Linear(dim, mlp_dim, **kw)
        self.down = nnx.Linear(mlp_dim, dim, **kw)

    def _split_heads(self, x):
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (*x.shape[:-1], self.heads, x.shape[-1] // self.heads)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _mlp(self, x):
        return x + self.down(jax.nn.relu(self.up(self.ln_mlp(x))))

    def __call__(self, x, mask=None):
        """``x [..., L, D]``; ``mask [L, L]`` (True where query i may read key j) or None."""
        q, k, v = self._split_heads(self.ln_attn(x))
        scores = jnp.einsum("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = jnp.where(mask, scores, -jnp.inf)
        attended = jnp.einsum("...hqk,...khd->...qhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + self.out(attended.reshape(x.shape))
        return self._mlp(x)

    def attend_cached(self, x, keys, values, position):
        """One position: ``x [..., D]`` at ``position``; ``keys``/``values`` ``[..., L, H, Dh]``
        hold the earlier positions. Returns ``(x_out, keys, values)`` with this position written.
        """
        q, k, v = self._split_heads(self.ln_attn(x))
        keys = jax.lax.dynamic_update_index_in_dim(keys, k, position, axis=-3)
        values = jax.lax.dynamic_update_index_in_dim(values, v, position, axis=-3)
        scores = jnp.einsum("...hd,...khd->...hk", q, keys) / math.sqrt(q.shape[-1])
        visible = jnp.arange(keys.shape[-3]) <= position
        scores = jnp.where(visible, scores, -jnp.inf)
        attended = jnp.einsum("...hk,...khd->...hd", jax.nn.softmax(scores, axis=-1), values)
        x = x + self.out(attended.reshape(x.shape))
        return self._mlp(x), keys, values


class _Trunk(nnx.Module):
    """Embeddings, blocks and a linear head shared by the ARM and the EBM (the subclass names
    the head's width: ``A`` logits or one reward)."""

    def _head_features(self, num_actions: int) -> int:
        raise NotImplementedError

    def __init__(
        self,
        num_actions,
        max_len,
        layers=2,
        heads=2,
        dim=16,
        mlp_dim=16,
        *,
        rngs,
        dtype=jnp.float32,
    ):
        self.num_actions, self.max_len = num_actions, max_len
        self.embed = nnx.Embed(num_actions + 1, dim, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, dim), dtype))
        self.blocks = nnx.List(
            [Block(dim, heads, mlp_dim, rngs=rngs, dtype=dtype) for _ in range(layers)]
        )
        features = self._head_features(num_actions)
        self.head = nnx.Linear(dim, features, rngs=rngs, dtype=dtype, param_dtype=dtype)

    def _inputs(self, tokens, prompt):
        """``[BOS, prompt, tokens]`` ``[..., L]``, with the prompt broadcast to the batch."""
        pieces = [tokens]
        if prompt is not None:
            prompt = jnp.asarray(prompt, tokens.dtype)
            batch = jnp.broadcast_shapes(prompt.shape[:-1], tokens.shape[:-1])
            pieces = [jnp.broadcast_to(x, (*batch, x.shape[-1])) for x in (prompt, tokens)]
        bos = jnp.full((*pieces[-1].shape[:-1], 1), self.num_actions, tokens.dtype)
        ids = jnp.concatenate([bos, *pieces], axis=-1)
        if ids.shape[-1] > self.max_len:
            raise ValueError(f"{ids.shape[-1]} positions exceed max_len={self.max_len}")
        return ids

    def encode(self, ids, mask):
        x = self.embed(ids) + self.positions[...][: ids.shape[-1]]
        for block in self.blocks:
            x = block(x, mask)
        return x


class TransformerARM(_Trunk):
    """Causal Transformer logits ``tokens [..., T] -> [..., T, A]`` with a key/value cache.

    Args:
        num_actions: ``A`` (``space.num_actions``).
        max_len: positions available, at least ``P + T`` (prompt length plus horizon).
        layers, heads, dim, mlp_dim: ``N``, ``H``, ``D``, ``F``.
        rngs: ``nnx.Rngs`` for the initial parameters.
        dtype: parameter and computation dtype.

    Use with ``seqppl.ARM.from_nnx(model, space)``: ``sample`` then runs ``init``/``step``.
    """

    def _head_features(self, num_actions):
        return num_actions

    def __call__(self, tokens, prompt=None):
        """Logits ``[..., T, A]``: entry t reads BOS, the prompt and ``tokens[..., :t]``."""
        ids = self._inputs(tokens[..., :-1], prompt)
        length = ids.shape[-1]
        x = self.encode(ids, jnp.tril(jnp.ones((length, length), bool)))
        return self.head(x[..., length - tokens.shape[-1] :, :])

    def init(self, batch_shape, prompt=None):
        """``(logits [*batch, A], cache)`` after reading BOS and the prompt (cached protocol)."""
        dim = self.positions.shape[-1]
        heads = self.blocks[0].heads
        shape = (*batch_shape, self.max_len, heads, dim // heads)
        dtype = self.positions[...].dtype
        cache = {
            "keys": [jnp.zeros(shape, dtype) for _ in self.blocks],
            "values": [jnp.zeros(shape, dtype) for _ in self.blocks],
            "position": jnp.zeros((), jnp.int32),
        }
        ids = self._inputs(jnp.zeros((*batch_shape, 0), jnp.int32), prompt)

        def read(cache, token):
            logits, cache = self.step(cache, token)
            return cache, logits

        cache, logits = jax.lax.scan(read, cache, jnp.moveaxis(ids, -1, 0))
        return logits[-1], cache

    def step(self, cache, token):
        """Read ``token [*batch]`` at the cache's position: ``(next logits [*batch, A], cache)``."""
        position = cache["position"]
        x = self.embed(token) + self.positions[...][position]
        keys, values = [], []
        for block, k, v in zip(self.blocks, cache["keys"], cache["values"], strict=True):
            x, k, v = block.attend_cached(x, k, v, position)
            keys.append(k)
            values.append(v)
        return self.head(x), {"keys": keys, "values": values, "position": position + 1}


class TransformerEBM(_Trunk):
    """Bidirectional Transformer reward ``tokens [..., T] -> R [...]``: mean over the positions
    ``[BOS, prompt, tokens]`` of the last block's output, then a linear head to one scalar.

    Use with ``seqppl.EBM.from_nnx(model, space)``.
    """

    def _head_features(self, num_actions):
        return 1

    def __call__(self, tokens, prompt=None):
        """The sequence reward ``[...]``."""
        x = self.encode(self._inputs(tokens, prompt), None)
        return self.head(x.mean(axis=-2))[..., 0]
