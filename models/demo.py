"""``seqppl demo``: the main job on an embedded default, the lookahead task.

A bigram over the digits 0..3 is conditioned on "the digit sum is divisible by 3" (an EBM on a
finite-state lattice). The demo converts it exactly to an ARM (M), samples it, distils a small
Transformer student into it, estimates log Z by importance sampling with that student as the
proposal and compares with the exact value, and reports the distillation error with Proposition
3's bound and the per-position split, next to the constrained decoder that masks only tokens after
which the constraint cannot be met. It writes ``report.md``, PNG figures and netCDF DataTrees.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from seqppl.models.tasks import digit_sum_task, locally_masked_arm, lookahead_student

import seqppl as sp

__all__ = ["run_demo", "demo_figures", "distillation_figure", "report_markdown"]


def run_demo(out: Path, quick: bool = False, seed: int = 0) -> dict:
    """Runs the demo, writes ``out/report.md``, figures and DataTrees; returns the figures.

    Args:
        out: output folder (created).
        quick: a smaller space and fewer distillation steps (under a minute on 2 CPU cores).
        seed: seeds the bigram, the student and every draw.

    Returns:
        a dict of the headline numbers (``log_z``, ``log_z_estimate``, ``log_z_stderr``,
        ``kl_constrained``, ``kl_student``, ``bound_student``, ``valid_fraction``, ``seconds``).
    """
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    length, steps = (6, 100) if quick else (8, 1500)
    key = jax.random.key(seed)
    keys = dict(zip(["sample", "distill", "is", "mc"], jax.random.split(key, 4), strict=True))

    space = sp.SequenceSpace(vocab_size=4, length=length, eos=True)
    task = digit_sum_task(space, modulus=3, seed=seed)
    target = sp.EBM.from_table(task.lattice, task.rewards)
    log_z = float(target.log_partition())
    print(f"target: bigram over digits 0..3, at most {length} of them, conditioned on a digit sum")
    print(f"divisible by 3 ({space.num_sequences:,} sequences); exact log Z = {log_z:.6f} (DP)")

    exact_arm = sp.to_arm(target)
    draws = exact_arm.sample(keys["sample"], (4096,))
    digits = jnp.where(draws < space.vocab_size, draws, 0)
    valid = float(jnp.mean(digits.sum(-1) % task.modulus == 0))
    gap = float(jnp.max(jnp.abs(exact_arm.log_prob(draws) - target.log_prob(draws))))
    print(
        f"exact ARM M(r): {valid:.0%} of 4,096 samples valid; max |log p_ARM - log p_EBM| "
        f"= {gap:.1e}"
    )

    print(f"  [{time.perf_counter() - started:.0f} s]")
    constrained = locally_masked_arm(task)
    constrained_report = sp.distillation_error(target, constrained)
    student, history = sp.distill(
        target,
        lookahead_student(constrained, seed=seed),
        "reverse_kl",
        estimator="score_function",
        steps=steps,
        learning_rate=3e-3,
        key=keys["distill"],
        evaluate="exact",
        log_every=max(steps // 10, 1),
    )
    report = sp.distillation_error(target, student)
    print(f"distilled the student ({steps} steps) [{time.perf_counter() - started:.0f} s]")
    estimate = sp.log_partition(target, "is", student, 5_000 if quick else 100_000, keys["is"])
    z_score = (estimate.log_z - log_z) / estimate.stderr
    print(f"importance sampling with the student [{time.perf_counter() - started:.0f} s]")

    warned = f" ({len(estimate.messages)} warnings below)" if estimate.messages else ""
    rows = [
        ("log Z (exact, DP)", f"{log_z:.5f}"),
        ("log Z (IS, student proposal)", f"{estimate.log_z:.5f} ± {estimate.stderr:.5f}"),
        ("(estimate − exact) / stderr", f"{z_score:+.2f}"),
        ("IS ESS / k-hat", f"{estimate.ess:.0f} / {estimate.khat:.2f}{warned}"),
        ("KL(constrained decoder ‖ target)", f"{constrained_report.kl_reverse:.4f}"),
        ("KL(student ‖ target)", f"{report.kl_reverse:.4f}"),
        ("KL(target ‖ student)", f"{report.kl_forward:.4f}"),
        ("bound 2T·ε (student)", f"{report.bound:.3f}"),
        (
            "worst position (constrained / student)",
            f"{_worst(constrained_report)} / {_worst(report)}",
        ),
    ]
    table = ["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    print("\n" + "\n".join(table))
    for message in estimate.messages:
        print(f"warning (IS estimate): {message}")
    if estimate.khat_note:
        print(f"note (IS estimate): {estimate.khat_note}")

    figures = demo_figures(constrained_report, report, history, estimate)
    import matplotlib.pyplot as plt  # after demo_figures chose the Agg backend

    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
    report.to_datatree().to_netcdf(out / "student_report.nc")
    constrained_report.to_datatree().to_netcdf(out / "constrained_report.nc")
    estimate.to_datatree().to_netcdf(out / "is_estimate.nc")
    seconds = time.perf_counter() - started
    header = (
        f"# seqppl demo ({'quick' if quick else 'full'}, seed {seed})\n\n"
        f"Target: bigram over digits 0..3, at most {length}, digit sum divisible by 3 "
        f"({space.num_sequences:,} sequences). Exact ARM: {valid:.0%} of 4,096 samples valid, "
        f"max |log p_ARM − log p_EBM| = {gap:.1e}. Student: constrained decoder + Transformer, "
        f"{steps} reverse-KL steps.\n"
    )
    text = report_markdown(header, rows, constrained_report, report, estimate)
    (out / "report.md").write_text(text + f"\nWall time {seconds:.0f} s.\n")
    print(f"\nwrote {out / 'report.md'}, figures and DataTrees ({seconds:.0f} s)")
    return {
        "log_z": log_z,
        "log_z_estimate": estimate.log_z,
        "log_z_stderr": estimate.stderr,
        "kl_constrained": constrained_report.kl_reverse,
        "kl_student": report.kl_reverse,
        "bound_student": report.bound,
        "valid_fraction": valid,
        "seconds": seconds,
    }


def report_markdown(header: str, rows, constrained_report, report, estimate) -> str:
    """``report.md``: ``header``, the table of ``rows`` (quantity, value), the IS estimate's
    warnings beneath it (``estimate.messages``, and ``khat_note``), the per-position KLs and the
    figures."""
    table = ["| quantity | value |", "|---|---|"] + [f"| {a} | {b} |" for a, b in rows]
    notes = [f"- **note (IS estimate):** {estimate.khat_note}"] if estimate.khat_note else []
    warned = [
        "\n".join([*(f"- **warning (IS estimate):** {m}" for m in estimate.messages), *notes])
    ]
    per_position = "\n".join(
        f"| {t} | {a:.5f} | {b:.5f} |"
        for t, (a, b) in enumerate(
            zip(constrained_report.per_position_kl, report.per_position_kl, strict=True)
        )
    )
    sections = [
        header.rstrip(),
        "\n".join(table),
        *(warned if estimate.messages or notes else []),
        "## Per-position KL(· ‖ target)",
        "| t | constrained | student |\n|---|---|---|\n" + per_position,
        "![distillation](distillation.png)",
        "![weights](is_weights.png)",
    ]
    return "\n\n".join(sections) + "\n"


def demo_figures(constrained_report, report, history, estimate) -> dict:
    """The demo's figures by file name: ``distillation.png`` (both models' per-position KL on
    one y scale, and the student's KL in training against the loose bound) and
    ``is_weights.png`` (the importance weights, with the estimate's warnings)."""
    import matplotlib

    matplotlib.use("Agg")
    return {
        "distillation.png": distillation_figure(constrained_report, report, history),
        "is_weights.png": estimate.plot().figure,
    }


def distillation_figure(constrained_report, report, history):
    """Three panels: the constrained decoder's and the student's per-position KL on one shared
    y scale, and the student's KL in training against the (loose) bound; a ``Figure``."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8), layout="constrained")
    axes[1].sharey(axes[0])
    constrained_report.plot(axes[0], name="constrained decoder")
    report.plot(axes[1], name="student")
    axes[1].set_title(axes[1].get_title() + " (same y scale)")
    sp.plot_distillation_history(history, axes[2])
    return fig


def _worst(report) -> int:
    """The position with the largest per-position KL."""
    return int(np.argmax(report.per_position_kl))
