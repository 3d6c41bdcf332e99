"""The ``seqppl`` command line: ``demo`` (the main job on an embedded default), ``reproduce``
(the paper's exact-risk experiments), ``logz`` (estimate log Z of a model) and ``info``.

Bad arguments exit with status 2 and one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import sys

from seqppl.cli_options import (
    add_option,
    nonnegative_int,
    positive_float,
    positive_int,
    unit_interval,
)

__all__ = ["main", "build_parser"]


_DESCRIPTION = (
    "Run seqppl's worked example, reproduce the paper's exact-risk experiments, estimate the "
    "log partition function of a sequence model, or print versions and devices. Each command "
    "has its own --help."
)
_SMC_REPLICATES = 16
"""The independent SMC runs behind ``logz --method smc`` (``sp.log_partition``'s default)."""


def build_parser() -> argparse.ArgumentParser:
    """The ``seqppl`` command line's argument parser (every subcommand and option)."""
    parser = argparse.ArgumentParser(prog="seqppl", description=_DESCRIPTION)
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        metavar="COMMAND",
        help="one of demo, logz, reproduce, distortion, info; COMMAND --help lists its options",
    )
    demo = sub.add_parser(
        "demo",
        help="the main job on the lookahead task: exact M, distillation, log Z, error report",
        description="A bigram over digits conditioned on a digit sum divisible by 3: converts "
        "the EBM exactly to an ARM, distils a Transformer student, estimates log Z by "
        "importance sampling with the student and compares with the exact value, and reports "
        "the distillation error (both KLs, the 2T·ε bound, the per-position split). Writes "
        "OUT/report.md, PNG figures and netCDF DataTrees.",
    )
    add_option(demo, "--quick", action="store_true", help="a smaller space and fewer steps")
    add_option(
        demo,
        "--seed",
        type=nonnegative_int,
        default=0,
        help="seeds the bigram, the student and every draw (jax.random.key(SEED))",
    )
    add_option(demo, "--out", default="demo", help="output folder for the report and figures")
    logz = sub.add_parser(
        "logz",
        help="estimate log Z of a model file or a named model",
        description="MODEL is a Python file defining target() -> EBM and optionally "
        "proposal() -> ARM, or one of the named models: "
        + ", ".join(sorted(_NAMED_MODELS))
        + ". Without a proposal the uniform policy over the space is used. The estimate is "
        "sp.log_partition(target, METHOD, proposal, NUM_SAMPLES, jax.random.key(SEED)).",
    )
    add_option(logz, "model", metavar="MODEL", help="FILE.py defining target(), or a named model")
    add_option(
        logz,
        "--method",
        choices=("auto", "exact", "is", "smc"),
        default="auto",
        help="exact (DP or enumeration), is (importance sampling), smc (sequential Monte "
        "Carlo) or auto: exact when tractable, else is",
    )
    add_option(
        logz,
        "--num-samples",
        type=positive_int,
        default=100_000,
        help="draws for is (at least 2); for smc the particles over all "
        f"{_SMC_REPLICATES} replicates (at least {2 * _SMC_REPLICATES}), as num_samples in "
        "sp.log_partition; unused by exact",
    )
    add_option(
        logz,
        "--seed",
        type=nonnegative_int,
        default=0,
        help="the key of every draw is jax.random.key(SEED), the same stream as "
        "jax.random.PRNGKey(SEED)",
    )
    add_option(
        logz,
        "--processes",
        type=positive_int,
        default=1,
        help="local processes of one jax.distributed job, one CPU device each, the draws split "
        "over them (docs/partition.md#several-processes); process 0 prints",
    )
    from seqppl.models.paper import ADAM_B2, CONFIGS, TARGETS

    reproduce = sub.add_parser(
        "reproduce",
        help="the paper's exact-risk experiments: teacher-forced ARM vs normalised EBM",
        description="Trains the Transformer EBM on the exact risk over every sequence, keeps its "
        "reward R*, trains the Transformer ARM and compares its logits with M(R*) at each logged "
        "step (docs/theory.md#the-papers-experiments). Writes OUT/metrics.csv, OUT/panels.png "
        "and OUT/summary.md; both trainings are checkpointed in OUT/checkpoints, so the same "
        "command again resumes an interrupted run.",
    )
    add_option(
        reproduce,
        "--config",
        choices=sorted(CONFIGS),
        default="v8t4-n2",
        help="the space and Transformer size: vVtT-nN is vocabulary V, length T, N layers",
    )
    add_option(
        reproduce,
        "--target",
        choices=TARGETS,
        default="zipf",
        help="the target distribution over sequences: Zipf ranks or a softmax of normals",
    )
    add_option(
        reproduce,
        "--steps",
        type=positive_int,
        default=5000,
        help="training steps of each model",
    )
    add_option(
        reproduce,
        "--lr",
        type=positive_float,
        default=1e-2,
        help="peak learning rate of both models",
    )
    add_option(
        reproduce,
        "--adam-b2",
        type=unit_interval,
        default=ADAM_B2,
        help="Adam's second-moment decay β₂ for both models (the paper does not state it)",
    )
    add_option(
        reproduce,
        "--seed",
        type=nonnegative_int,
        default=0,
        help="seeds the target, both models' initialisation and every draw",
    )
    add_option(
        reproduce,
        "--log-every",
        type=positive_int,
        default=50,
        help="steps between the logged comparisons (rows of metrics.csv)",
    )
    add_option(
        reproduce,
        "--zipf-order",
        choices=("random", "lexicographic"),
        default="random",
        help="ranks of the Zipf target: a seeded permutation (as in the paper) or enumeration "
        "order",
    )
    add_option(
        reproduce,
        "--out",
        default="reproduction",
        help="output folder for the metrics, plots, summary and checkpoints",
    )
    from seqppl.models.distortion_cli import add_command  # the distortion subcommand

    add_command(sub, add_option, nonnegative_int)
    sub.add_parser(
        "info",
        help="versions of seqppl and its dependencies, JAX backend and devices, float precision",
        description="Prints the version of seqppl, Python and each dependency (optional ones "
        "say 'not installed' when absent), the JAX backend and devices, and whether float64 is "
        "enabled.",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info()
    if args.command == "reproduce":
        return _reproduce(parser, args)
    if args.command == "logz":
        return _logz(parser, args)
    if "run" in args:  # a subcommand that brings its own handler (distortion)
        return args.run(parser, args)
    from seqppl.models.demo import run_demo

    result = run_demo(_writable(parser, args.out), quick=args.quick, seed=args.seed)
    consistent = abs(result["log_z_estimate"] - result["log_z"]) <= 4 * result["log_z_stderr"]
    return 0 if consistent and result["valid_fraction"] == 1.0 else 1


def _writable(parser, folder):
    """``folder`` as a Path, created and checked writable (else a one-line usage error)."""
    from pathlib import Path

    out = Path(folder)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as error:
        parser.error(f"--out {folder}: cannot write there ({error.strerror})")
    return out


def _reproduce(parser, args) -> int:
    from seqppl.loop import CheckpointError
    from seqppl.models.paper import reproduce

    out = _writable(parser, args.out)
    try:
        result = reproduce(
            args.config,
            args.target,
            args.steps,
            args.lr,
            args.seed,
            out,
            args.log_every,
            zipf_order=args.zipf_order,
            adam_b2=args.adam_b2,
        )
    except CheckpointError as error:  # OUT/checkpoints from other settings, or corrupted
        parser.error(str(error))
    except KeyboardInterrupt:
        print(
            f"interrupted: run the same command again to resume from {out / 'checkpoints'}",
            file=sys.stderr,
        )
        return 130
    print((out / "summary.md").read_text())
    print(f"metrics: {out / 'metrics.csv'}  plots: {out / 'panels.png'}")
    return 0 if result["step"].size else 1


def _info() -> int:
    from seqppl.environment import environment

    rows = environment()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _digit_sum_model():
    """The partition-estimation example's target: digits 0..9, at most 12, sum divisible by 7;
    the unconstrained bigram as the proposal."""
    import seqppl as sp
    from seqppl.models.tasks import digit_sum_task

    space = sp.SequenceSpace(vocab_size=10, length=12, eos=True)
    task = digit_sum_task(space, modulus=7)
    bigram = sp.ARM.from_table(sp.Lattice.markov(space, 1), task.bigram_logits)
    return sp.EBM.from_table(task.lattice, task.rewards), bigram


def _repetition_model():
    """The digit-sum target times a repetition penalty (no exact log Z): bigram proposal."""
    import seqppl as sp
    from seqppl.models.tasks import repetition_penalty

    target, bigram = _digit_sum_model()
    return target * sp.EBM(repetition_penalty(target.space), target.space), bigram


_NAMED_MODELS = {"digit-sum": _digit_sum_model, "digit-sum-repetition": _repetition_model}


def _load_model(parser, name):
    """``(target EBM, proposal ARM or None)`` from a named model or a Python file."""
    import importlib.util
    from pathlib import Path

    import seqppl as sp

    if name in _NAMED_MODELS:
        return _NAMED_MODELS[name]()
    path = Path(name)
    if path.suffix != ".py" or not path.is_file():
        parser.error(
            f"model {name!r} is neither a Python file nor a named model "
            f"({', '.join(sorted(_NAMED_MODELS))})"
        )
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's file: report it in one line
        parser.error(f"{name}: {type(error).__name__}: {error}")
    if not callable(getattr(module, "target", None)):
        parser.error(f"{name} must define target() returning an EBM")
    target = module.target()
    if not isinstance(target, sp.EBM):
        parser.error(f"{name}: target() returned {type(target).__name__}, not an EBM")
    proposal = module.proposal() if callable(getattr(module, "proposal", None)) else None
    if proposal is not None and not isinstance(proposal, sp.ARM):
        parser.error(f"{name}: proposal() returned {type(proposal).__name__}, not an ARM")
    return target, proposal


def _logz(parser, args) -> int:
    import jax
    import jax.numpy as jnp

    import seqppl as sp
    from seqppl.sharding import global_mesh

    if args.processes > 1:  # N local processes of python -m seqppl.distributed logz ...
        from seqppl.processes import run_job

        argv = ["logz", args.model, "--method", args.method, "--seed", str(args.seed)]
        argv += ["--num-samples", str(args.num_samples)]
        return run_job(["-m", "seqppl.distributed", *argv], args.processes, "seqppl logz")
    mesh = global_mesh() if jax.distributed.is_initialized() else None  # one process of a job
    target, proposal = _load_model(parser, args.model)
    exact = float(target.log_partition()) if target.exact_route.is_exact else None
    method = args.method if args.method != "auto" else ("exact" if exact is not None else "is")
    if method == "exact":
        if exact is None:
            parser.error(f"{args.model}: no exact log Z for this model; use --method is or smc")
        print(f"log Z = {exact:.6f} (exact)")
        return 0
    if proposal is None:
        space = target.space
        proposal = sp.ARM.from_table(
            sp.Lattice.markov(space, 0), jnp.zeros((1, space.num_actions)), target.prompt
        )
        print("no proposal() given: the uniform policy over the space is the proposal")
    # --num-samples is log_partition's num_samples: IS draws, or SMC particles over all
    # replicates (each needs 2); refused here so that the message names the option.
    least = 2 if method == "is" else 2 * _SMC_REPLICATES
    if args.num_samples < least:
        why = "" if method == "is" else f" ({_SMC_REPLICATES} replicates of at least 2 particles)"
        parser.error(
            f"--num-samples {args.num_samples}: --method {method} needs at least {least}{why}"
        )
    options = {"mesh": mesh, **({} if method == "is" else {"num_replicates": _SMC_REPLICATES})}
    try:
        est = sp.log_partition(
            target, method, proposal, args.num_samples, jax.random.key(args.seed), **options
        )
    except (TypeError, ValueError) as error:
        parser.error(f"{args.model}: {error}")
    print(est)
    if exact is not None:
        print(
            f"exact log Z = {exact:.6f}; (estimate − exact) / stderr = "
            f"{(est.log_z - exact) / est.stderr:+.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
