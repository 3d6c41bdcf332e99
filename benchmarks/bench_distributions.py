"""ARM/EBM distributions side by side with the NumPyro ways of writing the same chains, every
peer jitted.

- ``log_prob`` of N observed sequences: ``ARM.from_table(markov(1), q).log_prob`` against
  ``numpyro.contrib.control_flow.scan`` with one ``Categorical`` per step (``log_density``
  under ``jax.jit``).
- exact ``log Z``: ``EBM.from_table(...).log_partition()`` (one DP) against NumPyro's funsor
  enumeration, under ``jax.jit`` — the route a NumPyro user takes: ``contrib.funsor.enum`` +
  ``log_density`` of a ``markov`` loop (``history=k`` for Markov(k)) of enumerated uniform
  ``Categorical`` sites with the local reward as a ``factor``; and the same chain written with
  ``contrib.control_flow.scan`` (which funsor's elimination refuses here: a ``KeyError`` for
  Markov(1), a non-scalar joint density or an ``AssertionError`` for Markov(2)). Cases: V = 100,
  T = 64 (rewards N(0, 1) and N(0, 1000²)); T = 512; Markov(2) at T = 512. Each funsor run's
  value is compared with seqppl's exact one and its failures (wrong values from underflow, the
  recursion limit, errors inside funsor) are reported as such. Needs the
  ``bench`` extra; the funsor rows are skipped, and say so, when funsor is missing.
- sampling throughput (sequences per second): a lattice ARM, a callable ARM re-evaluated on the
  growing buffer, the same callable with the cached-step protocol, and NumPyro's ``Predictive``
  of the scan model, jitted.

Times: median steady state after the first (compiling) call, ended by ``block_until_ready``;
"compile+first" is that first call.

    python benchmarks/bench_distributions.py          # float64
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
from numpyro.infer import Predictive
from numpyro.infer.util import log_density

import seqppl as sp

jax.config.update("jax_enable_x64", True)


def scan_model(logits, y=None, horizon=None, num=None):
    """The bigram as NumPyro users write it: a scan with a Categorical per step, ``y [N, T]``
    observed (or ``num`` sequences of ``horizon`` drawn when ``y`` is None)."""
    num = y.shape[0] if y is not None else num
    bos = jnp.full(num, logits.shape[0] - 1)

    def step(previous, y_t):
        with numpyro.plate("data", num):
            token = numpyro.sample("y", dist.Categorical(logits=logits[previous]), obs=y_t)
        return token, None

    scan(step, bos, None if y is None else y.T, length=horizon)


def funsor_chain(rewards, horizon, order, use_scan=False):
    """``log Σ_y exp Σ_t r[context_t, y_t]`` by funsor's variable elimination: each token an
    enumerated uniform ``Categorical`` plus its reward as a ``factor``; the context is the last
    ``order`` tokens (pad ``V``), its table ``rewards [(V+1)^order, V]``."""
    import funsor
    from numpyro.contrib.funsor import enum, markov
    from numpyro.contrib.funsor import log_density as funsor_log_density

    funsor.set_backend("jax")
    num_tokens = rewards.shape[-1]
    table = rewards.reshape((num_tokens + 1,) * order + (num_tokens,))
    uniform = jnp.zeros(num_tokens)

    def site(name, context):
        token = numpyro.sample(
            name, dist.Categorical(logits=uniform), infer={"enumerate": "parallel"}
        )
        numpyro.factor(f"r_{name}", table[context + (token,)] + jnp.log(num_tokens))
        return token

    def loop():
        context = (num_tokens,) * order
        for t in markov(range(horizon), history=order):
            context = context[1:] + (site(f"y_{t}", context),)

    def scanned():
        def step(context, _):
            return context[1:] + (site("y", context),), None

        start = tuple(jnp.asarray(num_tokens) for _ in range(order))
        scan(step, start, None, length=horizon, history=order)

    model = scanned if use_scan else loop
    return funsor_log_density(enum(model, first_available_dim=-1), (), {}, {})[0]


def funsor_row(label, name, fn, rewards, exact, repeats, rows, notes):
    """Times a jitted funsor route and checks its value against seqppl's exact ``log Z``."""
    try:
        compile_s, steady, value = timed(jax.jit(fn), rewards, repeats=repeats)
    except Exception as error:  # a failure of the peer is a result here
        where = "tracing (recursion limit)" if isinstance(error, RecursionError) else "funsor"
        rows.append((label, f"{name}: fails ({type(error).__name__} in {where})", 0, 0))
        notes.append(f"{label}: {name} fails with {type(error).__name__} in {where}")
        return None
    value = float(value)
    ok = np.isclose(value, exact, rtol=1e-6)
    verdict = "" if ok else f": WRONG, {value:.6g} (exact {exact:.6g})"
    rows.append((label, f"{name}{verdict}", compile_s, steady))
    return steady if ok else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    vocab, horizon, num_seqs = (10, 8, 100) if args.tiny else (100, 64, 10_000)
    long, small = (16, 4) if args.tiny else (512, 10)
    space = sp.SequenceSpace(vocab_size=vocab, length=horizon)
    lat = sp.Lattice.markov(space, order=1)
    logits = jax.random.normal(jax.random.key(0), (lat.num_states, vocab))
    arm = sp.ARM.from_table(lat, logits)
    y = arm.sample(jax.random.key(1), (num_seqs,))
    rows, notes = [], []

    # log_prob of N sequences
    ours = jax.jit(lambda d, y: d.log_prob(y).sum())
    theirs = jax.jit(lambda q, y: log_density(scan_model, (q, y), {}, {})[0])
    c_o, t_o, lp_o = timed(ours, arm, y, repeats=args.repeats)
    c_s, t_s, lp_s = timed(theirs, logits, y, repeats=args.repeats)
    np.testing.assert_allclose(lp_o, lp_s, rtol=1e-10)
    label = f"log_prob, {num_seqs} seqs, V={vocab} T={horizon}"
    rows += [
        (label, "seqppl ARM.log_prob", c_o, t_o),
        (label, "numpyro scan + Categorical, log_density (jit)", c_s, t_s),
    ]
    notes.append(f"log_prob: numpyro scan / seqppl time = {t_s / t_o:.1f}")

    # exact log Z against jitted funsor
    have_funsor = importlib.util.find_spec("funsor") is not None
    cases = [
        (vocab, horizon, 1, 1.0),
        (vocab, horizon, 1, 1000.0),
        (vocab, long, 1, 1.0),
        (small, long, 2, 1.0),
    ]
    for v, t, order, scale in cases:
        lat_c = sp.Lattice.markov(sp.SequenceSpace(vocab_size=v, length=t), order)
        r = scale * jax.random.normal(jax.random.key(3), (lat_c.num_states, v))
        ebm = sp.EBM.from_table(lat_c, r)
        c_z, t_z, log_z = timed(jax.jit(lambda d: d.log_partition()), ebm, repeats=args.repeats)
        label = f"exact log Z, Markov({order}) V={v} T={t}, r ~ N(0, {scale:g}²)"
        rows.append((label, "seqppl EBM.log_partition (DP)", c_z, t_z))
        if not have_funsor:
            rows.append((label, "funsor: skipped (pip install seqppl[bench])", 0, 0))
            continue
        for name, use_scan in (("funsor markov loop (jit)", False), ("funsor scan (jit)", True)):
            steady = funsor_row(
                label, name, lambda table, t=t, o=order, s=use_scan: funsor_chain(table, t, o, s),
                r, float(log_z), max(1, args.repeats // 2), rows, notes,
            )  # fmt: skip
            if steady is not None:
                notes.append(f"{label}: {name} / seqppl time = {steady / t_z:.2f}")

    # sampling throughput
    class CachedBigram:
        def __call__(self, tokens):
            bos = jnp.full((*tokens.shape[:-1], 1), logits.shape[0] - 1, tokens.dtype)
            return logits[jnp.concatenate([bos, tokens[..., :-1]], -1)]

        def init(self, batch_shape):
            return jnp.broadcast_to(logits[-1], (*batch_shape, logits.shape[1])), None

        def step(self, state, token):
            return logits[token], state

    key = jax.random.key(2)
    samplers = [
        ("seqppl lattice ARM (table lookups)", arm),
        ("seqppl callable ARM (re-evaluation, O(T²))", sp.ARM(CachedBigram().__call__, space)),
        ("seqppl callable ARM (cached step)", sp.ARM(CachedBigram(), space)),
    ]
    draws = {}
    label = f"sample {num_seqs} seqs, V={vocab} T={horizon}"
    for name, d in samplers:
        fn = jax.jit(lambda d, k: d.sample(k, (num_seqs,)))
        c, t, draws[name] = timed(fn, d, key, repeats=args.repeats)
        rows.append((label, name, c, t, num_seqs / t))
    predictive = jax.jit(
        lambda k: Predictive(scan_model, num_samples=1)(k, logits, None, horizon, num_seqs)["y"]
    )
    c_p, t_p, drawn = timed(predictive, key, repeats=args.repeats)
    assert drawn.shape[-2:] == (horizon, num_seqs)
    rows.append((label, "numpyro Predictive of the scan model (jit)", c_p, t_p, num_seqs / t_p))
    lattice, plain, cached = (draws[name] for name, _ in samplers)
    np.testing.assert_array_equal(plain, cached)  # same key, same arithmetic, same draws
    assert np.mean(np.all(lattice == plain, -1)) > 0.999  # CDF tables round differently
    t_lattice = next(row[3] for row in rows if row[1] == samplers[0][0])
    notes.append(f"sampling: numpyro Predictive / seqppl lattice ARM time = {t_p / t_lattice:.1f}")

    print(f"jax {jax.__version__}, numpyro {numpyro.__version__}, device {jax.devices()[0]}")
    print("float64; every peer jitted\n")
    print_timing_table("task", "implementation", "sequences/s", rows)
    print()
    print("\n".join(notes))


if __name__ == "__main__":
    main()
