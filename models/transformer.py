"""The paper's Transformers in Flax NNX (docs/theory.md#the-papers-experiments): a causal ARM
with a key/value cache, and a bidirectional EBM.

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


def _matmul_dtype(dtype, matmul_dtype):
    dtype = jnp.dtype(dtype if matmul_dtype is None else matmul_dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"matmul_dtype must be a floating dtype, got {dtype}")
    return dtype


def _linear(fan_in, fan_out, rngs, dtype, matmul_dtype):
    """A dense layer with ``dtype`` parameters whose product reads ``matmul_dtype`` inputs and
    accumulates in ``dtype``."""
    return nnx.Linear(
        fan_in,
        fan_out,
        rngs=rngs,
        dtype=matmul_dtype,
        param_dtype=dtype,
        preferred_element_type=dtype,
    )


class Block(nnx.Module):
    """One pre-LayerNorm block with biased fused QKV and output projections; parameters, norms
    and softmax in ``dtype``, matrix products on ``matmul_dtype`` inputs accumulated in ``dtype``.

    ``__call__(x [..., L, D], mask [L, L] | None)``; ``attend_cached`` for one new position.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        matmul_dtype=None,
    ):
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.heads = heads
        self.dtype = dtype
        self.matmul_dtype = _matmul_dtype(dtype, matmul_dtype)
        norm = {"rngs": rngs, "dtype": dtype, "param_dtype": dtype}
        self.ln_attn = nnx.LayerNorm(dim, **norm)
        self.qkv = _linear(dim, 3 * dim, rngs, dtype, self.matmul_dtype)
        self.out = _linear(dim, dim, rngs, dtype, self.matmul_dtype)
        self.ln_mlp = nnx.LayerNorm(dim, **norm)
        self.up = _linear(dim, mlp_dim, rngs, dtype, self.matmul_dtype)
        self.down = _linear(mlp_dim, dim, rngs, dtype, self.matmul_dtype)

    def _product(self, spec, a, b):
        """``einsum(spec, a, b)`` with ``matmul_dtype`` inputs, accumulated in ``dtype``."""
        cast = self.matmul_dtype
        return jnp.einsum(spec, a.astype(cast), b.astype(cast), preferred_element_type=self.dtype)

    def _split_heads(self, x):
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        shape = (*x.shape[:-1], self.heads, x.shape[-1] // self.heads)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)

    def _mlp(self, x):
        return x + self.down(jax.nn.relu(self.up(self.ln_mlp(x))))

    def __call__(self, x, mask=None):
        """``x [..., L, D]``; ``mask [L, L]`` (True where query i may read key j) or None."""
        q, k, v = self._split_heads(self.ln_attn(x))
        scores = self._product("...qhd,...khd->...hqk", q, k) / math.sqrt(q.shape[-1])
        if mask is not None:
            scores = jnp.where(mask, scores, -jnp.inf)
        attended = self._product("...hqk,...khd->...qhd", jax.nn.softmax(scores, axis=-1), v)
        x = x + self.out(attended.reshape(x.shape))
        return self._mlp(x)

    def attend_cached(self, x, keys, values, position):
        """One position: ``x [..., D]`` at ``position``; ``keys``/``values`` ``[..., L, H, Dh]``
        hold the earlier positions. Returns ``(x_out, keys, values)`` with this position written.
        """
        q, k, v = self._split_heads(self.ln_attn(x))
        keys = jax.lax.dynamic_update_index_in_dim(keys, k.astype(keys.dtype), position, axis=-3)
        values = jax.lax.dynamic_update_index_in_dim(values, v.astype(keys.dtype), position, -3)
        scores = self._product("...hd,...khd->...hk", q, keys) / math.sqrt(q.shape[-1])
        visible = jnp.arange(keys.shape[-3]) <= position
        scores = jnp.where(visible, scores, -jnp.inf)
        attended = self._product("...hk,...khd->...hd", jax.nn.softmax(scores, axis=-1), values)
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
        matmul_dtype=None,
    ):
        self.num_actions, self.max_len = num_actions, max_len
        self.matmul_dtype = _matmul_dtype(dtype, matmul_dtype)
        self.embed = nnx.Embed(num_actions + 1, dim, rngs=rngs, dtype=dtype, param_dtype=dtype)
        self.positions = nnx.Param(0.02 * jax.random.normal(rngs.params(), (max_len, dim), dtype))
        self.blocks = nnx.List(
            [
                Block(dim, heads, mlp_dim, rngs=rngs, dtype=dtype, matmul_dtype=matmul_dtype)
                for _ in range(layers)
            ]
        )
        features = self._head_features(num_actions)
        self.head = _linear(dim, features, rngs, dtype, self.matmul_dtype)

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
        max_len: positions available, at least ``P + T`` (prompt length plus horizon); an
            ``ARM.from_nnx`` over a longer prompt and horizon raises ``ValueError`` when built
            (the cached steps of ``sample`` could not tell), as ``log_prob`` would.
        layers, heads, dim, mlp_dim: ``N``, ``H``, ``D``, ``F``.
        rngs: ``nnx.Rngs`` for the initial parameters.
        dtype: parameter dtype and the dtype of everything but the matrix products (LayerNorm,
            softmax, the residual stream, the logits).
        matmul_dtype: input dtype of every matrix product (dense layers, attention), which
            accumulate in ``dtype``; e.g. ``jnp.bfloat16`` with float32 parameters. Default
            ``dtype``. The key/value cache is kept in it. Gradients flow back in ``dtype``
            (the backward products take ``dtype`` cotangents).

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
        cache = {  # keys and values as the attention products read them
            "keys": [jnp.zeros(shape, self.matmul_dtype) for _ in self.blocks],
            "values": [jnp.zeros(shape, self.matmul_dtype) for _ in self.blocks],
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
    Arguments as ``TransformerARM``'s (``max_len`` at least ``1 + P + T``).

    Use with ``seqppl.EBM.from_nnx(model, space)``.
    """

    def _head_features(self, num_actions):
        return 1

    def __call__(self, tokens, prompt=None):
        """The sequence reward ``[...]``."""
        x = self.encode(self._inputs(tokens, prompt), None)
        return self.head(x.mean(axis=-2))[..., 0]
