"""How sure are we of a distillation error? Deep ensembles of students, compared in ArviZ.

The target is the lookahead task of examples/lookahead.py (a bigram conditioned on "the digit sum
is divisible by 3"). Each student is the constrained decoder plus a trainable table of logit
corrections on a lattice: per position only ("unigram"), per previous token ("bigram"), or per
previous token and running digit sum (the task's own lattice, which can represent the target
exactly). Every configuration is distilled from several seeds (initial table and training draws:
a deep ensemble); each student's error is estimated by Monte Carlo. The ArviZ summary and forest
plot compare the configurations, and the spread over students is split into the Monte Carlo error
of the reports and the spread between students.

    python examples/student_posterior.py [--quick] [--seed N] [--out DIR]
"""

import argparse
from pathlib import Path

import arviz_stats
import jax
import jax.numpy as jnp
from seqppl.models.tasks import digit_sum_task, locally_masked_arm

import seqppl as sp


def corrected_student(base: sp.ARM, lattice: sp.Lattice, seed: int) -> sp.ARM:
    """``base.log_policies + C[t, s_t]`` with a table ``C`` ``[T, S, A]`` on ``lattice``."""
    space = base.space
    shape = (space.horizon, lattice.num_states, space.num_actions)
    table = 0.3 * jax.random.normal(jax.random.key(seed), shape)

    def logits_fn(params, tokens):
        rows = params[jnp.arange(space.horizon), lattice.states(tokens)]
        return base.log_policies(tokens) + rows

    return sp.ARM(logits_fn, space, params=table)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two sizes, fewer students and steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the forest plot and the DataTree here")
    args = parser.parse_args(argv)
    members, steps = (2, 60) if args.quick else (8, 500)

    space = sp.SequenceSpace(vocab_size=4, length=5, eos=True)
    task = digit_sum_task(space, modulus=3, seed=args.seed)
    target = sp.EBM.from_table(task.lattice, task.rewards)
    base = locally_masked_arm(task)
    print(f"constrained decoder: KL = {sp.distillation_error(target, base).kl_reverse:.4f}")
    configurations = {
        "unigram": sp.Lattice.markov(space, 0),
        "bigram": sp.Lattice.markov(space, 1),
        "task lattice": task.lattice,
    }
    if args.quick:  # the smallest and the exact-capable student only
        del configurations["bigram"]
    reports = {}
    for name, lattice in configurations.items():
        reports[name] = []
        for member in range(members):
            seed = 1000 * args.seed + member
            student, _ = sp.distill(
                target,
                corrected_student(base, lattice, seed),
                "reverse_kl",
                estimator="score_function",
                num_samples=128,
                steps=steps,
                learning_rate=0.05,
                key=jax.random.key(seed),
                evaluate=None,
                progress=False,
            )
            report = sp.distillation_error(
                target,
                student,
                "mc",
                key=jax.random.fold_in(jax.random.key(seed), 1),
                num_samples=1000,
            )
            reports[name].append(report)
        print(f"{name}: {members} students distilled")

    tree = sp.distillation_posterior(reports)
    print("\nArviZ summary of KL(student ‖ target) over the students:")
    print(arviz_stats.summary(tree, var_names=["kl_reverse"], kind="stats").to_string())
    print("\nspread over students, split (Var = between² + mc²):")
    print(sp.student_summary(tree).to_string(float_format=lambda v: f"{v:.5f}"))

    if args.out is not None:
        import arviz_plots
        import matplotlib

        matplotlib.use("Agg")
        args.out.mkdir(parents=True, exist_ok=True)
        plot = arviz_plots.plot_forest(tree, var_names=["kl_reverse", "kl_forward"])
        plot.savefig(args.out / "students_forest.png")
        tree.to_netcdf(args.out / "students.nc")
        print(f"wrote {args.out / 'students_forest.png'} and {args.out / 'students.nc'}")


if __name__ == "__main__":
    main()
