"""Character-level language models on the docstrings of Python's own standard library.

The corpus is built at run time (``seqppl.models.corpus``: no download), split by file into
training and held-out text, and cut into windows of T characters. A trigram (Markov(2) table)
ARM and a small causal Transformer ARM are trained by teacher forcing with ``sp.fit``; the
held-out bits per character of each are reported, next to the unigram baseline.

    python examples/stdlib_charlm.py [--quick] [--seed N]
"""

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from seqppl.models.corpus import ALPHABET, decode, encode, stdlib_docstrings, windows
from seqppl.models.transformer import TransformerARM

import seqppl as sp


def bits_per_char(arm, data):
    """Held-out ``−mean log₂ p(window) / T``."""
    log_p = jnp.concatenate([arm.log_prob(chunk) for chunk in np.array_split(data, 8)])
    return float(-log_p.mean() / (data.shape[1] * math.log(2)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="part of the stdlib, fewer steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    max_files, steps, length = (250, 150, 32) if args.quick else (None, 2000, 64)

    start = time.perf_counter()
    train_text, heldout_text = stdlib_docstrings(max_files)
    train = windows(encode(train_text), length)
    heldout = windows(encode(heldout_text), length, max_windows=1000)
    print(
        f"corpus: {len(train_text):,} training / {len(heldout_text):,} held-out characters "
        f"from stdlib docstrings ({time.perf_counter() - start:.1f} s); windows of {length}"
    )
    space = sp.SequenceSpace(vocab_size=len(ALPHABET), length=length, eos=False)
    counts = np.bincount(train.ravel(), minlength=len(ALPHABET)) + 1.0
    unigram = sp.ARM.from_table(sp.Lattice.markov(space, 0), jnp.log(counts / counts.sum())[None])
    print(f"unigram (counts)        held-out bits/char: {bits_per_char(unigram, heldout):.3f}")

    key = jax.random.key(args.seed)
    trigram_lattice = sp.Lattice.markov(space, 2)
    trigram = sp.ARM.from_table(
        trigram_lattice, jnp.zeros((trigram_lattice.num_states, space.num_actions))
    )
    with jax.numpy_rank_promotion("allow"):
        transformer = sp.ARM.from_nnx(
            TransformerARM(space.num_actions, length, 2, 4, 64, 128, rngs=nnx.Rngs(args.seed)),
            space,
        )
        for name, arm, lr in [
            ("trigram (Markov(2))", trigram, 0.1),
            ("transformer N=2 D=64", transformer, 3e-3),
        ]:
            start = time.perf_counter()
            trained, history = sp.fit(
                arm, train, steps=steps, batch_size=64, key=key, learning_rate=lr, progress=False
            )
            seconds = time.perf_counter() - start
            print(
                f"{name:23s} held-out bits/char: {bits_per_char(trained, heldout):.3f} "
                f"({steps} steps, {steps * 64 * length / seconds:,.0f} training tokens/s)"
            )
        sample = trained.sample(jax.random.key(args.seed + 1))
    print(f"\na sample from the transformer: {decode(sample)!r}")


if __name__ == "__main__":
    main()
