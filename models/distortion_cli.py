"""``seqppl distortion``: the command line of the distortion benchmark (``models.distortion``).

``seqppl.cli`` adds the subcommand with ``add_command`` and runs ``args.run(parser, args)``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["add_command", "run_command"]


def add_command(sub, option, seed_type) -> None:
    """Adds the ``distortion`` subcommand to ``sub`` (the subparsers of ``seqppl.cli``):
    ``option(parser, *flags, help=..., **kwargs)`` adds an option whose help states its
    default, ``seed_type`` parses an integer >= 0; ``args.run`` is ``run_command``."""
    parser = sub.add_parser(
        "distortion",
        help="how far masking decoders are from the conditional, on a fixed suite of constraints",
        description="Decodes JSON objects (whitespace-permissive), an option set, a date, an "
        "identifier and balanced brackets from a BPE bigram with myopic masking, feasible "
        "masking and the exact decoder M, and measures each exactly (dynamic programs, no "
        "sampling): both KLs, TV, per-position KL, P(invalid), P(length limit), lengths, option "
        "probabilities. Writes OUT/distortion.csv, OUT/distortion.md and PNG figures, and "
        "prints the tables. Exits 1 if the exact decoder is not the target.",
    )
    option(
        parser,
        "--quick",
        action="store_true",
        help="a 128-token vocabulary, a counts bigram and one length limit (seconds)",
    )
    option(
        parser,
        "--seed",
        type=seed_type,
        default=0,
        help="seeds the bigram's fit (jax.random.key(SEED)); unused by --quick",
    )
    option(parser, "--out", default="distortion", help="output folder for tables and figures")
    parser.set_defaults(run=run_command)


def run_command(parser, args) -> int:
    """Runs ``run_distortion`` into ``args.out`` and prints its tables; 0, or 1 when the exact
    decoder is not the target (KL above 10⁻⁴ or an invalid output): a broken pipeline."""
    from seqppl.models.distortion import distortion_markdown, run_distortion

    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as error:
        parser.error(f"--out {args.out}: cannot write there ({error.strerror})")
    rows = run_distortion(out, quick=args.quick, seed=args.seed)
    print(distortion_markdown(rows))
    print(f"table: {out / 'distortion.md'}  data: {out / 'distortion.csv'}  figures: {out}")
    exact = [row for row in rows if row["decoder"] == "exact"]
    return 0 if all(r["kl_reverse"] < 1e-4 and r["p_invalid"] == 0 for r in exact) else 1
