"""Importance sampling of log Z: seqppl's streamed estimator against the plain NumPyro route.

- Throughput (proposal samples/s) and ESS per second for a Markov(1) lattice proposal at
  ``T = 64``: ``sp.log_partition(ebm, "is", arm, n)`` (chunked sampling with the step
  log-probs reused, rewards by one gather) against NumPyro as users write it: ``Predictive``
  of a ``scan`` proposal model with one ``Categorical`` per step, then
  ``vmap(log_density)`` of the proposal and of the target model (``Categorical`` plus a
  ``factor`` restoring the unnormalised reward). Both give the same weights (asserted).
- Peak memory (max RSS of a fresh process) for ``n`` from 10⁵ to 10⁷ with the kept-sample cap
  fixed: the estimator streams, so memory should stay flat.

    python benchmarks/bench_partition.py          # V = 16, T = 64, 10^6 samples; RSS to 10^7
    python benchmarks/bench_partition.py --tiny   # seconds: the smoke run the tests use
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.contrib.control_flow import scan
from numpyro.infer import Predictive
from numpyro.infer.util import log_density

import seqppl as sp


def problem(vocab, horizon):
    space = sp.SequenceSpace(vocab_size=vocab, length=horizon, eos=False)
    lat = sp.Lattice.markov(space, 1)
    r = jax.random.normal(jax.random.key(0), (lat.num_states, vocab))
    q = r + 0.3 * jax.random.normal(jax.random.key(1), r.shape)
    return lat, sp.EBM.from_table(lat, r), sp.ARM.from_table(lat, q), r, q


def chain_model(table, delta, horizon, unnormalised=False, y=None):
    """A Markov(1) chain over ``horizon`` tokens with logits ``table[state]``; with
    ``unnormalised`` a ``factor`` adds back ``logsumexp`` so the density is ``Σ_t r``."""

    def step(state, y_t):
        logits = table[state]
        token = numpyro.sample("y", dist.Categorical(logits=logits), obs=y_t)
        if unnormalised:
            numpyro.factor("scale", jax.nn.logsumexp(logits))
        return delta[state, token], None

    scan(step, jnp.asarray(table.shape[0] - 1), y, length=horizon)


def numpyro_is(r, q, delta, horizon, n, key):
    """log Ẑ and log weights by the plain NumPyro route."""
    ys = Predictive(chain_model, num_samples=n)(key, q, delta, horizon)["y"]

    def log_w(y):
        target = log_density(chain_model, (r, delta, horizon, True, y), {}, {})[0]
        proposal = log_density(chain_model, (q, delta, horizon, False, y), {}, {})[0]
        return target - proposal

    w = jax.vmap(log_w)(ys)
    return jax.nn.logsumexp(w) - jnp.log(n), ys, w


def memory_probe(n, vocab, horizon):
    """Runs one estimate of ``n`` samples; prints the process's peak RSS in MiB."""
    _, ebm, arm, _, _ = problem(vocab, horizon)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sp.EstimateWarning)
        sp.log_partition(ebm, "is", arm, n, jax.random.key(3), target_samples=None, progress=False)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-probe", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    vocab, horizon = (4, 8) if args.tiny else (16, 64)
    if args.memory_probe:
        return memory_probe(args.memory_probe, vocab, horizon)
    n, n_numpyro = (2_000, 1_000) if args.tiny else (1_000_000, 65_536)
    sizes = (1_000, 10_000) if args.tiny else (100_000, 1_000_000, 10_000_000)
    lat, ebm, arm, r, q = problem(vocab, horizon)
    delta = jnp.asarray(lat.delta)
    key = jax.random.key(2)

    # the NumPyro route, checked against seqppl's weights on its own draws
    route = jax.jit(lambda k: numpyro_is(r, q, delta, horizon, n_numpyro, k))
    jax.block_until_ready(route(key))
    times = []
    for i in range(args.repeats):
        start = time.perf_counter()
        log_z_np, ys, w = jax.block_until_ready(route(jax.random.fold_in(key, i)))
        times.append(time.perf_counter() - start)
    ours_w = ebm.unnormalized_log_prob(ys) - arm.log_prob(ys)
    np.testing.assert_allclose(ours_w, w, rtol=1e-4, atol=1e-4)
    t_numpyro = float(np.median(times))

    def ours(i):
        return sp.log_partition(
            ebm, "is", arm, n, jax.random.fold_in(key, i), target_samples=None, progress=False
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sp.EstimateWarning)
        ours(0)
        times, estimates = [], []
        for i in range(args.repeats):
            start = time.perf_counter()
            estimates.append(ours(i + 1))
            times.append(time.perf_counter() - start)
    t_ours = float(np.median(times))
    est = estimates[-1]
    exact = float(ebm.log_partition())
    assert abs(est.log_z - exact) <= 5 * est.stderr, (est.log_z, exact, est.stderr)

    ess_numpyro = float(sp.diagnostics.kish_ess(np.asarray(w)))
    print(f"jax {jax.__version__}, numpyro {numpyro.__version__}, device {jax.devices()[0]}")
    print(f"V={vocab}, T={horizon}, Markov(1) proposal; exact log Z {exact:.4f}\n")
    print("| route | samples | steady (s) | samples/s | ESS/s |")
    print("|---|---|---|---|---|")
    print(
        f"| seqppl sp.log_partition(method='is') | {n} | {t_ours:.3f} | {n / t_ours:.3g} | "
        f"{est.ess / t_ours:.3g} |"
    )
    print(
        f"| numpyro Predictive + vmap(log_density) | {n_numpyro} | {t_numpyro:.3f} | "
        f"{n_numpyro / t_numpyro:.3g} | {ess_numpyro / t_numpyro:.3g} |"
    )
    speedup = (n / t_ours) / (n_numpyro / t_numpyro)
    print(f"\nthroughput: seqppl / numpyro = {speedup:.1f} (goal >= 10)\n")

    print("| samples | peak RSS (MiB) |")
    print("|---|---|")
    peaks = []
    for size in sizes:
        out = subprocess.run(
            [sys.executable, __file__, "--memory-probe", str(size)]
            + (["--tiny"] if args.tiny else []),
            capture_output=True,
            text=True,
            check=True,
        )
        peaks.append(float(out.stdout.strip().splitlines()[-1]))
        print(f"| {size} | {peaks[-1]:.0f} |")
    print(f"\npeak RSS {sizes[-1]} / {sizes[0]} samples = {peaks[-1] / peaks[0]:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
