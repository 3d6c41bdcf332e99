"""Distillation throughput: steps per second of ``sp.distill`` for the Transformer student of the
lookahead task (examples/lookahead.py), per objective, and the wall time of that example.

The student is ``models.tasks.lookahead_student`` (the constrained decoder plus a causal
Transformer, N = 2, H = 2, D = 32, F = 64) on the digit-sum task over 4 digits, at most 6 of them
(5,461 sequences). Steps per second exclude the first step (compilation): they are read from the
history's wall-clock column. ``reverse_kl (exact)`` enumerates all 5,461 sequences per step.

    python benchmarks/bench_distill.py           # 200 steps per objective, then the example
    python benchmarks/bench_distill.py --tiny    # one objective, a few steps: the tests' smoke run
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import jax
from seqppl.models.tasks import digit_sum_task, locally_masked_arm, lookahead_student

import seqppl as sp

OBJECTIVES = {
    "reverse_kl (score function)": {"objective": "reverse_kl", "estimator": "score_function"},
    "reverse_kl (exact)": {"objective": "reverse_kl", "estimator": "exact"},
    "forward_kl (on-policy)": {"objective": "forward_kl"},
    "soft_bellman": {"objective": "soft_bellman"},
}


def steps_per_second(target, student, steps, num_samples, options) -> float:
    _, history = sp.distill(
        target,
        student,
        steps=steps,
        num_samples=num_samples,
        key=jax.random.key(0),
        learning_rate=3e-3,
        log_every=1,
        evaluate=None,
        progress=False,
        **options,
    )
    seconds = history["seconds"]
    return (len(seconds) - 1) / (seconds[-1] - seconds[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a few steps, no example run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per objective (best kept)")
    args = parser.parse_args(argv)
    steps, num_samples = (5, 32) if args.tiny else (200, 256)
    length = 3 if args.tiny else 6

    space = sp.SequenceSpace(vocab_size=4, length=length, eos=True)
    task = digit_sum_task(space, modulus=3, seed=0)
    target = sp.EBM.from_table(task.lattice, task.rewards)
    student = lookahead_student(locally_masked_arm(task))
    print(
        f"device: {jax.devices()[0].device_kind}; {space.num_sequences} sequences; "
        f"{num_samples} draws per step\n"
    )
    print("| objective | steps/s | ms/step |")
    print("|---|---|---|")
    objectives = list(OBJECTIVES.items())[:1] if args.tiny else OBJECTIVES.items()
    for name, options in objectives:
        rate = max(
            steps_per_second(target, student, steps, num_samples, options)
            for _ in range(args.repeats)
        )
        print(f"| {name} | {rate:.1f} | {1000 / rate:.1f} |")
    if not args.tiny:
        example = Path(__file__).resolve().parents[1] / "examples" / "lookahead.py"
        for flag in ([], ["--quick"]):
            started = time.perf_counter()
            subprocess.run([sys.executable, str(example), *flag], check=True, capture_output=True)
            label = "quick" if flag else "full"
            print(f"\nexamples/lookahead.py ({label}): {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
