"""ARM/EBM distributions side by side with the NumPyro ways of writing the same bigram chain.

- ``log_prob`` of N observed sequences: ``ARM.from_table(markov(1), q).log_prob`` against
  ``numpyro.contrib.control_flow.scan`` with one ``Categorical`` per step (``log_density``).
- exact ``log Z`` of the bigram EBM: ``EBM.from_table(...).log_partition()`` (one DP) against
  NumPyro's funsor enumeration (``contrib.funsor`` with ``markov``: each token an enumerated
  uniform ``Categorical`` and the local reward as a ``factor``). Needs the ``bench`` extra; the
  row is skipped, and says so, when funsor is missing.
- sampling throughput (sequences per second) of a lattice ARM, a callable ARM re-evaluated on the
  growing buffer, and the same callable with the cached-step protocol.

Both sides of each comparison are asserted equal first. Times: median steady state after the
first (compiling) call, ended by ``block_until_ready``.

    python benchmarks/bench_distributions.py          # T = 64, V = 100, 10,000 sequences
    python benchmarks/bench_distributions.py --tiny   # seconds: the smoke run the tests use
"""

from __future__ import annotations

import argparse
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from bench_bellman import print_timing_table, timed
from numpyro.contrib.control_flow import scan
from numpyro.infer.util import log_density

import seqppl as sp


def scan_model(logits, y):
    """The bigram as NumPyro users write it: a scan with a Categorical per step, ``y [N, T]``."""
    bos = jnp.full(y.shape[0], logits.shape[0] - 1, y.dtype)

    def step(previous, y_t):
        with numpyro.plate("data", y.shape[0]):
            token = numpyro.sample("y", dist.Categorical(logits=logits[previous]), obs=y_t)
        return token, None

    scan(step, bos, y.T)


def funsor_log_z(rewards, horizon):
    """``log Σ_y exp Σ_t r[y_{t-1}, y_t]`` by funsor's variable elimination over a markov chain."""
    import funsor
    from numpyro.contrib.funsor import enum, markov
    from numpyro.contrib.funsor import log_density as funsor_log_density

    funsor.set_backend("jax")
    num_tokens = rewards.shape[1]
    uniform = jnp.zeros(num_tokens)

    def chain():
        previous = rewards.shape[0] - 1  # the start-pad state
        for t in markov(range(horizon)):
            token = numpyro.sample(
                f"y_{t}", dist.Categorical(logits=uniform), infer={"enumerate": "parallel"}
            )
            numpyro.factor(f"r_{t}", rewards[previous, token] + jnp.log(num_tokens))
            previous = token

    return funsor_log_density(enum(chain, first_available_dim=-1), (), {}, {})[0]


class CachedBigram:
    """A callable bigram logits function that also offers the cached-step protocol."""

    def __init__(self, logits):
        self.logits = logits

    def __call__(self, tokens):
        bos = jnp.full((*tokens.shape[:-1], 1), self.logits.shape[0] - 1, tokens.dtype)
        return self.logits[jnp.concatenate([bos, tokens[..., :-1]], -1)]

    def init(self, batch_shape):
        return jnp.broadcast_to(self.logits[-1], (*batch_shape, self.logits.shape[1])), None

    def step(self, state, token):
        return self.logits[token], state


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    vocab, horizon, num_seqs = (10, 8, 100) if args.tiny else (100, 64, 10_000)
    space = sp.SequenceSpace(vocab_size=vocab, length=horizon)
    lat = sp.Lattice.markov(space, order=1)
    logits = jax.random.normal(jax.random.key(0), (lat.num_states, vocab))
    arm = sp.ARM.from_table(lat, logits)
    y = arm.sample(jax.random.key(1), (num_seqs,))
    rows = []

    # log_prob of N sequences
    ours = jax.jit(lambda d, y: d.log_prob(y).sum())
    theirs = jax.jit(lambda q, y: log_density(scan_model, (q, y), {}, {})[0])
    c_o, t_o, lp_o = timed(ours, arm, y, repeats=args.repeats)
    c_s, t_s, lp_s = timed(theirs, logits, y, repeats=args.repeats)
    np.testing.assert_allclose(lp_o, lp_s, rtol=1e-5)
    label = f"log_prob, {num_seqs} seqs, V={vocab} T={horizon}"
    rows += [
        (label, "seqppl ARM.log_prob", c_o, t_o),
        (label, "numpyro scan + Categorical", c_s, t_s),
    ]
    ratios = [f"log_prob: scan / seqppl time = {t_s / t_o:.2f} (goal >= 1)"]

    # exact log Z
    ebm = sp.EBM.from_table(lat, logits)
    c_z, t_z, log_z = timed(jax.jit(lambda d: d.log_partition()), ebm, repeats=args.repeats)
    label = f"exact log Z, V={vocab} T={horizon}"
    rows.append((label, "seqppl EBM.log_partition (DP)", c_z, t_z))
    if importlib.util.find_spec("funsor") is None:
        rows.append((label, "funsor enumeration: skipped (pip install seqppl[bench])", 0, 0))
    else:
        c_f, t_f, log_z_f = timed(
            lambda r: funsor_log_z(r, horizon), logits, repeats=max(1, args.repeats // 2)
        )
        np.testing.assert_allclose(log_z, log_z_f, rtol=1e-5)
        rows.append((label, "numpyro contrib.funsor enumeration (markov)", c_f, t_f))
        ratios.append(f"log Z: funsor / seqppl time = {t_f / t_z:.0f} (goal >= 10)")

    # sampling throughput
    callable_arm = sp.ARM(CachedBigram(logits).__call__, space)
    cached_arm = sp.ARM(CachedBigram(logits), space)
    key = jax.random.key(2)
    samplers = [
        ("lattice ARM (table lookups)", arm),
        ("callable ARM (re-evaluation, O(T²))", callable_arm),
        ("callable ARM (cached step)", cached_arm),
    ]
    draws = {}
    label = f"sample {num_seqs} seqs, V={vocab} T={horizon}"
    for name, d in samplers:
        fn = jax.jit(lambda d, k: d.sample(k, (num_seqs,)))
        c, t, draws[name] = timed(fn, d, key, repeats=args.repeats)
        rows.append((label, name, c, t, num_seqs / t))
    lattice, plain, cached = (draws[name] for name, _ in samplers)
    np.testing.assert_array_equal(plain, cached)  # same key, same arithmetic, same draws
    # the lattice ARM draws from CDF tables accumulated once: the same uniforms land on the same
    # tokens except where float32 rounding of the two CDFs differs (a few in 10^5 tokens)
    assert np.mean(np.all(lattice == plain, -1)) > 0.999

    print(f"jax {jax.__version__}, numpyro {numpyro.__version__}, device {jax.devices()[0]}\n")
    print_timing_table("task", "implementation", "sequences/s", rows)
    print()
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
