"""The lookahead task: where an autoregressive model must plan, and what distillation buys.

The target conditions a random bigram over the digits 0..3 (at most 6 of them, then EOS) on "the
digit sum is divisible by 3" (models/tasks.py). Three ARMs are compared with it:

(i)   the exact soft-Bellman ARM ``M(r)``: only valid samples, and ``log p_ARM = log p_EBM`` on
      every sequence, so its samples follow the conditional distribution exactly;
(ii)  a constrained decoder that masks each token after which the constraint cannot be met any
      more and renormalises the bigram over the rest: also only valid samples, but off the target
      by a KL that the report measures, position by position;
(iii) a Transformer student that starts as (ii) and is distilled from the EBM by the RL objective
      (reverse KL, score-function gradients): its per-position KL shrinks where (ii) fails.

    python examples/lookahead.py [--quick] [--seed N] [--out DIR]
"""

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from seqppl.models.tasks import digit_sum_task, locally_masked_arm, lookahead_student

import seqppl as sp


def per_position_table(reports: dict) -> None:
    names = list(reports)
    print(f"{'t':>3} " + " ".join(f"{name:>14}" for name in names))
    horizon = next(iter(reports.values())).horizon
    for t in range(horizon):
        print(f"{t:>3} " + " ".join(f"{r.per_position_kl[t]:14.5f}" for r in reports.values()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer distillation steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write figures and the reports' DataTrees here")
    args = parser.parse_args(argv)
    steps = 120 if args.quick else 1500
    key = jax.random.key(args.seed)

    space = sp.SequenceSpace(vocab_size=4, length=6, eos=True)
    task = digit_sum_task(space, modulus=3, seed=args.seed)
    target = sp.EBM.from_table(task.lattice, task.rewards)
    print(
        f"space: {space.num_sequences} sequences; P_bigram(digit sum ≡ 0 mod 3) = "
        f"{float(jnp.exp(target.log_partition())):.4f}"
    )

    def valid(tokens):
        digits = jnp.where(tokens < space.vocab_size, tokens, 0)
        return bool(jnp.all(digits.sum(-1) % task.modulus == 0))

    # (i) the exact ARM
    exact = sp.to_arm(target)
    seqs = jnp.asarray(space.enumerate())
    gap = jnp.abs(exact.log_prob(seqs) - target.log_prob(seqs))
    finite = jnp.isfinite(target.log_prob(seqs))
    print("\n(i) exact ARM M(r)")
    print(f"all digit sums divisible by 3 (4096 samples): {valid(exact.sample(key, (4096,)))}")
    print(f"max |log p_ARM - log p_EBM| over the support = {float(gap[finite].max()):.2e}")

    # (ii) the constrained decoder
    local = locally_masked_arm(task)
    local_report = sp.distillation_error(target, local)
    print("\n(ii) constrained decoder (masks tokens that make the constraint unsatisfiable)")
    print(f"all digit sums divisible by 3 (4096 samples): {valid(local.sample(key, (4096,)))}")
    print(local_report)

    # (iii) a distilled Transformer student
    student = lookahead_student(local, seed=args.seed)
    started = time.perf_counter()
    trained, history = sp.distill(
        target,
        student,
        "reverse_kl",
        estimator="score_function",
        steps=steps,
        num_samples=256,
        learning_rate=3e-3,
        key=key,
        log_every=max(steps // 10, 1),
    )
    seconds = time.perf_counter() - started
    student_report = sp.distillation_error(target, trained)
    print(
        f"\n(iii) Transformer student distilled for {steps} steps ({seconds:.0f} s, "
        f"{steps / seconds:.1f} steps/s)"
    )
    print(student_report)
    print("\nper-position KL(student ‖ target)")
    per_position_table({"constrained": local_report, "distilled": student_report})
    late = slice(space.horizon // 2, None)
    share = local_report.per_position_kl[late].sum() / local_report.kl_reverse
    print(f"share of the constrained decoder's KL in the second half: {share:.2f}")
    ratio = local_report.kl_reverse / student_report.kl_reverse
    print(f"KL reduction by distillation: {ratio:.1f}x")
    check = sp.distillation_error(target, trained, "mc", key=key, num_samples=1024)
    low, high = check.kl_reverse_interval
    print(
        f"Monte Carlo check of the student's reverse KL: {check.kl_reverse:.5f} "
        f"[{low:.5f}, {high:.5f}] (exact {student_report.kl_reverse:.5f})"
    )

    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        from seqppl.models.demo import distillation_figure  # the demo's figure, same task

        args.out.mkdir(parents=True, exist_ok=True)
        fig = distillation_figure(local_report, student_report, history)
        fig.savefig(args.out / "lookahead.png", dpi=120)
        for name, report in (("constrained", local_report), ("distilled", student_report)):
            report.to_datatree().to_netcdf(args.out / f"{name}_report.nc")
        print(f"wrote {args.out / 'lookahead.png'} and the reports' netCDF files")


if __name__ == "__main__":
    main()
