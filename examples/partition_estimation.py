"""Partition functions by importance sampling and SMC, checked against exact answers.

The target is a bigram language model over the digits 0..9 (at most 12, then EOS) constrained to
responses whose digit sum is divisible by 7: ``log Z = log P_bigram(constraint)``, exact by one
dynamic program. Each estimator reports its standard error, ESS, Pareto k-hat and the
ELBO ≤ log Z ≤ EUBO sandwich. A poor (uniform) proposal triggers the k-hat warning. Then a reward
with no finite-state structure (a repetition penalty as a Python function) makes exact answers
unavailable: IS and twisted SMC must agree with each other within their standard errors.

    python examples/partition_estimation.py [--quick] [--seed N] [--out DIR]
"""

import argparse
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from seqppl.models.tasks import digit_sum_task, repetition_penalty

import seqppl as sp


def lattice_twist(ebm):
    """A causal twist ``[P, T] -> [P, T]`` from a lattice EBM's rewards and soft values
    (``Φ_t = Σ_{k≤t} r_k + V[t+1, s_{t+1}]``): exact for ``ebm``, an approximation for any
    target that multiplies ``ebm`` by more rewards."""
    lat, table = ebm.joint, ebm.reward_table()
    values = sp.soft_values(lat, table)
    space = ebm.space

    def twist(tokens):
        states = lat.states(tokens)  # [P, T], the state before each decision
        active = space.active(tokens)
        done = jnp.cumsum(lat.path_scores(table, tokens), -1)  # Σ_{k≤t} r_k (0 after EOS)
        nxt = jnp.concatenate([states[..., 1:], states[..., -1:]], -1)
        ahead = values[jnp.minimum(jnp.arange(space.horizon) + 1, space.horizon - 1), nxt]
        still = jnp.concatenate([active[..., 1:], jnp.zeros_like(active[..., :1])], -1)
        return done + jnp.where(still, ahead, 0.0)

    return twist


def row(name, est, exact=None):
    error = "" if exact is None else f"{(est.log_z - exact) / max(est.stderr, 1e-300):+7.2f}"
    elbo = "-inf" if est.elbo == -np.inf else f"{est.elbo:.4f}"
    eubo = "  none" if est.eubo is None else f"{est.eubo:.4f}"
    print(
        f"{name:<24} {est.log_z:9.4f} {est.stderr:8.4f} {error:>8} {est.ess:9.1f} "
        f"{est.khat:6.2f} {elbo:>9} {eubo:>8}"
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the weight plot and the DataTree here")
    args = parser.parse_args(argv)
    n = 20_000 if args.quick else 200_000
    key = jax.random.key(args.seed)

    space = sp.SequenceSpace(vocab_size=10, length=12, eos=True)
    task = digit_sum_task(space, modulus=7, seed=args.seed)
    target = sp.EBM.from_table(task.lattice, task.rewards)
    bigram = sp.ARM.from_table(sp.Lattice.markov(space, 1), task.bigram_logits)
    exact = float(target.log_partition())
    print(f"space: {space.num_sequences:.3g} sequences; exact log Z = {exact:.6f} (DP)")
    print(
        f"{'method':<24} {'log Z':>9} {'stderr':>8} {'err/se':>8} {'ESS':>9} {'k-hat':>6} "
        f"{'ELBO':>9} {'EUBO':>8}"
    )
    estimates = {
        "IS, bigram proposal": sp.log_partition(target, "is", bigram, n, key),
        "SMC, no twist": sp.log_partition(target, "smc", bigram, n // 4, key),
        "SMC, exact twist": sp.log_partition(target, "smc", bigram, n // 4, key, twist="exact"),
    }
    for name, est in estimates.items():
        row(name, est, exact)

    # a poor proposal: uniform digits for 12-digit responses (fixed length, so no short
    # response repeats often enough to make the weights' tail an atom)
    fixed = sp.SequenceSpace(vocab_size=10, length=12, eos=False)
    fixed_task = digit_sum_task(fixed, modulus=7, seed=args.seed)
    fixed_target = sp.EBM.from_table(fixed_task.lattice, fixed_task.rewards)
    uniform = sp.ARM.from_table(sp.Lattice.markov(fixed, 0), jnp.zeros((1, fixed.num_actions)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", sp.EstimateWarning)
        poor = sp.log_partition(fixed_target, "is", uniform, n, key, target_samples=None)
    fixed_exact = float(fixed_target.log_partition())
    print(f"\npoor proposal (uniform digits, 12-digit responses): k-hat = {poor.khat:.2f}")
    print(f"exact {fixed_exact:.4f}, estimate {poor.log_z:.4f} ± {poor.stderr:.4f}")
    print(f"ESS {poor.ess:.1f} of {n}")
    for warning in caught:
        print(f"  EstimateWarning: {warning.message}")

    penalised = target * sp.EBM(repetition_penalty(space), space)
    print("\nno exact answer: the target times a repetition penalty (a Python function)")
    is_est = sp.log_partition(penalised, "is", bigram, n, key)
    smc_est = sp.log_partition(penalised, "smc", bigram, n // 4, key, twist=lattice_twist(target))
    for name, est in (("IS, bigram proposal", is_est), ("SMC, approximate twist", smc_est)):
        row(name, est)
    gap = abs(is_est.log_z - smc_est.log_z) / np.hypot(is_est.stderr, smc_est.stderr)
    print(f"|IS - SMC| / combined stderr = {gap:.2f}")

    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        args.out.mkdir(parents=True, exist_ok=True)
        axes = estimates["IS, bigram proposal"].plot()
        axes.figure.savefig(args.out / "is_weights.png", dpi=120)
        estimates["IS, bigram proposal"].to_datatree().to_netcdf(args.out / "is_estimate.nc")
        print(f"wrote {args.out / 'is_weights.png'} and {args.out / 'is_estimate.nc'}")


if __name__ == "__main__":
    main()
