"""Neural ARMs: cached (key/value) vs re-evaluated sampling, and training throughput.

- Sampling tokens per second of the causal Transformer ARM (N=3, H=4, D=64, F=64) at T = 128:
  the cached-step protocol (one position per step, a key/value cache) against re-running the
  whole buffer at every step (O(T²)). Both must give the same sequences for the same key.
- Training throughput (tokens/s) of ``sp.fit`` with teacher forcing on the stdlib corpus for the
  Transformer and a trigram table ARM.

    python benchmarks/bench_models.py          # T = 128, batch 64
    python benchmarks/bench_models.py --tiny   # seconds: the smoke run the tests use
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from bench_bellman import print_timing_table, timed
from flax import nnx
from seqppl.models.corpus import ALPHABET, encode, stdlib_docstrings, windows
from seqppl.models.transformer import TransformerARM

import seqppl as sp


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    horizon, batch, steps, files = (16, 8, 10, 20) if args.tiny else (128, 64, 100, 300)
    sizes = (3, 4, 64, 64)
    rows = []
    with jax.numpy_rank_promotion("allow"):
        space = sp.SequenceSpace(vocab_size=len(ALPHABET), length=horizon, eos=False)
        module = TransformerARM(space.num_actions, horizon, *sizes, rngs=nnx.Rngs(0))
        cached = sp.ARM.from_nnx(module, space)
        plain = sp.ARM(lambda p, t: cached.logits_fn(p, t), space, params=cached.params)
        draws = {}
        for name, arm in [("cached (key/value)", cached), ("re-evaluated (O(T²))", plain)]:
            fn = jax.jit(lambda d, k: d.sample(k, (batch,)))
            c, t, draws[name] = timed(fn, arm, jax.random.key(1), repeats=args.repeats)
            rows.append(
                (f"sample {batch} x T={horizon}, N=3 D=64", name, c, t, batch * horizon / t)
            )
        np.testing.assert_array_equal(*draws.values())  # same key, same sequences
        speedup = rows[1][3] / rows[0][3]

        train_text, _ = stdlib_docstrings(files)
        data = windows(encode(train_text), horizon)
        trigram = sp.Lattice.markov(space, 2)
        models = [
            ("transformer N=3 D=64", cached, 3e-3),
            ("trigram table", sp.ARM.from_table(trigram, np.zeros((trigram.num_states, 96))), 0.1),
        ]
        for name, arm, lr in models:  # steady rate from fit's own clock, compile excluded
            _, history = sp.fit(
                arm,
                data,
                steps=steps,
                batch_size=batch,
                key=jax.random.key(0),
                learning_rate=lr,
                log_every=1,
                progress=False,
            )
            seconds = (history["seconds"][-1] - history["seconds"][0]) / (steps - 1)
            rows.append(
                (
                    f"fit, batch {batch} x T={horizon}",
                    name,
                    history["seconds"][0],
                    seconds,
                    batch * horizon / seconds,
                )
            )

    print(f"jax {jax.__version__}, device {jax.devices()[0]}, float32\n")
    print_timing_table("task", "implementation", "tokens/s", rows)
    print(f"\ncached / re-evaluated sampling throughput = {speedup:.1f}x (goal >= 5)")


if __name__ == "__main__":
    main()
