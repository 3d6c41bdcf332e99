"""A large Transformer ARM: ``log_prob`` with bf16 matrix products against the bf16 matmul rate,
and cached sampling tokens/s (issue 8).

Model N=8 blocks, H=8 heads, D=512, F=2048, A=64 actions, T=512, batch 256; float32 parameters,
``matmul_dtype`` bfloat16 (products accumulate in float32) or float32. The matmul work of one
``log_prob`` is counted by hand per token and block: QKV ``2·D·3D``, output ``2·D²``, MLP
``2·2·D·F``, attention ``2·2·L·D`` over all ``L`` key positions (the causal mask is applied to
full products), plus the head ``2·D·A``. The limit is one large bf16 matmul measured on the same
device (``[8192, 8192] × [8192, 8192]``); achieved/limit is the first goal of issue 8 (≥ 30%).

    python benchmarks/bench_transformer.py          # the sizes above (a GPU)
    python benchmarks/bench_transformer.py --tiny   # seconds: the smoke run the tests use
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from bench_bellman import print_timing_table, timed
from flax import nnx
from seqppl.models.transformer import TransformerARM

import seqppl as sp


def matmul_rate(size: int, repeats: int) -> float:
    """FLOP/s of one ``[size, size] × [size, size]`` bf16 product accumulated in float32."""
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.bfloat16)
    product = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    _, seconds, _ = timed(product, a, a, repeats=repeats)
    return 2 * size**3 / seconds


FULL = {"layers": 8, "heads": 8, "dim": 512, "mlp_dim": 2048, "actions": 64, "horizon": 512}
TINY = {"layers": 2, "heads": 2, "dim": 32, "mlp_dim": 64, "actions": 8, "horizon": 16}


def log_prob_flops(batch, layers, dim, mlp_dim, actions, horizon, **_) -> int:
    """Matmul FLOPs of one ``log_prob`` (see the module docstring)."""
    per_token = layers * (2 * dim * 3 * dim + 2 * dim * dim + 4 * dim * mlp_dim + 4 * horizon * dim)
    return batch * horizon * (per_token + 2 * dim * actions)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sizes, batch, square = (TINY, 8, 256) if args.tiny else (FULL, 256, 8192)
    limit = matmul_rate(square, args.repeats)
    flops = log_prob_flops(batch, **sizes)
    horizon = sizes["horizon"]
    space = sp.SequenceSpace(vocab_size=sizes["actions"], length=horizon, eos=False)
    shape = [sizes[name] for name in ("actions", "horizon", "layers", "heads", "dim", "mlp_dim")]
    rows, log_probs = [], {}
    with jax.numpy_rank_promotion("allow"):
        for name, matmul_dtype in [("bf16 matmuls", jnp.bfloat16), ("float32", jnp.float32)]:
            module = TransformerARM(*shape, rngs=nnx.Rngs(0), matmul_dtype=matmul_dtype)
            arm = sp.ARM.from_nnx(module, space)
            sample = jax.jit(lambda d, k: d.sample(k, (batch,)))
            first, seconds, y = timed(sample, arm, jax.random.key(1), repeats=args.repeats)
            tokens = f"{batch * horizon / seconds:.3g} tokens/s"
            rows.append((f"cached sample {batch} x T={horizon}", name, first, seconds, tokens))
            log_prob = jax.jit(lambda d, y: d.log_prob(y))
            first, seconds, log_probs[name] = timed(log_prob, arm, y, repeats=args.repeats)
            rate = f"{flops / seconds:.3g} FLOP/s = {flops / seconds / limit:.1%} of the limit"
            rows.append((f"log_prob {batch} x T={horizon}", name, first, seconds, rate))
    difference = np.max(np.abs(log_probs["bf16 matmuls"] - log_probs["float32"]))
    scale = np.max(np.abs(log_probs["float32"]))
    assert np.isfinite(difference) and difference <= 0.05 * scale, (difference, scale)

    described = " ".join(f"{k}={v}" for k, v in sizes.items())
    print(f"jax {jax.__version__}, device {jax.devices()[0]}; {described}\n")
    print(f"limit: bf16 matmul [{square}, {square}]², {limit:.3g} FLOP/s\n")
    print_timing_table("task", "matmuls", "rate", rows)
    print(f"\nmax |log_prob(bf16) − log_prob(float32)| = {difference:.3g} (|log p| ≤ {scale:.3g})")


if __name__ == "__main__":
    main()
