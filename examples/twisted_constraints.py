"""SMC under a regex constraint for a character Transformer, with and without a lattice twist.

A causal Transformer is trained on the words of the stdlib docstrings (``sp.fit``); the
constraint asks for an acronym, ``[A-Z]{2,4}``. No lattice holds the Transformer, so base ×
constraint has no exact M; but the accepted words can be listed, so the target ``p ∝ p_base ·
1[accepted]`` and ``log Z = log P_base(acronym)`` are exact here. A bigram fit to the base's
own samples, times the constraint's DFA, has exact soft values V by dynamic programming: they
are the twist. SMC with the base as proposal runs with no twist, with the lattice twist
(``twist=bigram.constrain(dfa)``) and with the lattice's values on the base's own prefix
probability; each estimate is compared with the exact log Z, and its weighted particles with
the exact target (TV). docs/twisted_smc.md has the particle-scaling study.

    python examples/twisted_constraints.py [--quick] [--seed N]
"""

import argparse
import time
import warnings

import jax
import numpy as np
from seqppl.models import bpe
from seqppl.models import twist_study as ts

import seqppl as sp


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny base, fewer particles")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = ts.BaseConfig(40, 8, layers=1, heads=2, dim=16, mlp_dim=32, steps=60, batch_size=64)
    config = (quick if args.quick else ts.BaseConfig())._replace(seed=args.seed)
    length, pattern, particles = (6, "[A-Z]{2,3}", 256) if args.quick else (10, "[A-Z]{2,4}", 2000)
    key = jax.random.key(args.seed)

    started = time.perf_counter()
    module, params, history = ts.train_base(config)
    base = ts.base_on(module, params, length)
    print(
        f"base: Transformer N={config.layers} D={config.dim} on stdlib words, {config.steps} "
        f"steps, loss {history['loss'][-1]:.2f} nats/word ({time.perf_counter() - started:.0f} s)"
    )
    dfa = sp.Lattice.regex(base.space, pattern, ts.TEXTS)
    exact = ts.exact_target(base, dfa)
    top = np.argsort(exact.log_p)[::-1][:5]
    names = ", ".join(bpe.detokenize(ts.TEXTS, exact.sequences[top]))
    print(f"constraint {pattern}: {len(exact.log_p):,} accepted words, the likeliest {names}")
    print(f"exact log Z = {exact.log_z:.4f} (P_base(accepted) = {np.exp(exact.log_z):.2e})")

    bigram = ts.bigram_fit(base, jax.random.fold_in(key, 1), 4000 if args.quick else 20_000)
    approx = bigram.constrain(dfa)
    print(f"bigram × DFA ({approx.joint.num_states} states): log P = {approx.log_partition():.4f}")

    target = base.constrain(dfa)
    twists = {
        "SMC, no twist": None,
        "SMC, lattice twist": approx,
        "SMC, lattice values": sp.TableTwist.from_lattice(base, approx),
    }
    runs = 4
    print(f"\n{runs} runs of {particles} particles each, pooled; TV: mean over the runs")
    print(f"{'sampler':<22} {'log Z':>9} {'stderr':>8} {'err/se':>7} {'TV':>6} {'accepted':>9}")
    for name, twist in twists.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.EstimateWarning)  # the untwisted run degenerates
            est = sp.log_partition(
                target,
                "smc",
                base,
                particles * runs,
                jax.random.fold_in(key, 2),
                twist=twist,
                num_replicates=runs,
                max_kept=particles * runs,
                target_samples=None,
            )
        tokens, log_w = ts.run_arrays(est, runs)
        metrics = [
            ts.particle_metrics(exact, t, w, base.space.eos_id)
            for t, w in zip(tokens, log_w, strict=True)
        ]
        tv = np.mean([m["tv"] for m in metrics])
        accepted = np.mean([m["accepted"] for m in metrics])
        z = (est.log_z - exact.log_z) / est.stderr if np.isfinite(est.log_z) else -np.inf
        print(f"{name:<22} {est.log_z:9.4f} {est.stderr:8.4f} {z:7.2f} {tv:6.3f} {accepted:9.3f}")


if __name__ == "__main__":
    main()
