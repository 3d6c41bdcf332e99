"""``seqppl distortion``: how far masking decoders are from the conditional, on a fixed suite.

Each constraint of ``SUITE`` (JSON objects from a schema with permissive whitespace, an option
set whose options share first tokens, a date format, an identifier, brackets) is decoded from
one BPE bigram (``models.bpe``: a tokenizer and ``ngram_base`` fit on stdlib docstrings) by
``sp.masked_arm``'s myopic and feasible masking and by the exact decoder
``M = sp.to_arm(base.constrain(dfa))``. Every figure is exact (``distortion_dp``: dynamic
programs on base × DFA, enumeration of the accepted sequences for TV where they are few), none
sampled. ``run_distortion`` writes ``distortion.csv``, ``distortion_per_position.csv``,
``distortion.md`` and the figures of ``distortion_figures``.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from seqppl.models.bpe import ngram_base, token_texts, train_tokenizer
from seqppl.models.corpus import stdlib_docstrings
from seqppl.models.distortion_dp import DECODERS, distortion_reports

import seqppl as sp
from seqppl import constraints
from seqppl.options import options_lattice

__all__ = [
    "Constraint",
    "SUITE",
    "SCHEMA",
    "WHITESPACE",
    "constraint_lattice",
    "suite_base",
    "run_distortion",
    "distortion_markdown",
    "write_csv",
]

SCHEMA = {
    "type": "object",
    "properties": {"id": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["id", "ok"],
}
"""The JSON constraint's schema: ``{"id": <integer>, "ok": <boolean>}``."""
WHITESPACE = r"[ \n\t]*"
"""Whitespace allowed between JSON tokens: any run, so a decoder can pad without end."""


class Constraint(NamedTuple):
    """One constraint of the suite: its ``name``, a one-line description ``what``, its regex
    ``pattern`` (for ``"json"`` compiled from ``SCHEMA``; for ``"options"`` the option trie of
    ``options``) and ``length``, the length limit of the full run."""

    name: str
    what: str
    pattern: str
    length: int
    options: tuple[str, ...] = ()


SUITE = (
    Constraint("json", '{"id": integer, "ok": boolean}, whitespace [ \\n\\t]*', "", 32),
    Constraint(
        "options", "one of skill, sky, skip, cloud", "", 8, ("skill", "sky", "skip", "cloud")
    ),
    Constraint("date", "YYYY-MM-DD", "[0-9]{4}-[0-9]{2}-[0-9]{2}", 12),
    Constraint("identifier", "a Python-style identifier", "[A-Za-z_][A-Za-z0-9_]*", 16),
    Constraint("brackets", "balanced (), depth at most 3", constraints.dyck(3), 8),
)
"""The constraints, in the order of the table."""

_SETTINGS = {  # quick only: one length limit and product size for all, so one compilation
    False: dict(vocab_size=256, max_files=300, method="fit", length=None, num_states=None),
    True: dict(vocab_size=128, max_files=30, method="counts", length=20, num_states=128),
}
_FIT_STEPS = 1000


def constraint_lattice(constraint: Constraint, space: sp.SequenceSpace, texts):
    """``(dfa, option_states)``: the constraint's automaton over ``space`` with token texts
    ``texts`` (``[V]`` strings) and ``{option: accepting state}`` (options only; else empty)."""
    if constraint.name == "json":
        dfa = sp.Lattice.json_schema(space, SCHEMA, texts, whitespace=WHITESPACE)
    elif constraint.options:
        dfa = options_lattice(space, constraint.options, texts)
    else:
        dfa = sp.Lattice.regex(space, constraint.pattern, texts)
    option_states = {}
    for option in constraint.options:
        state = dfa.initial
        for token in _spelling(option, texts):
            state = int(dfa.delta[state, token])
        option_states[option] = state
    return dfa, option_states


def _spelling(text: str, texts) -> list[int]:
    """One tokenisation of ``text`` (greedy longest match; every option is spelled by one)."""
    ids, at = [], 0
    while at < len(text):
        fits = [i for i, piece in enumerate(texts) if piece and text.startswith(piece, at)]
        best = max(fits, key=lambda i: len(texts[i]))
        ids.append(best)
        at += len(texts[best])
    return ids


def suite_base(quick: bool = False, seed: int = 0) -> tuple[list[str], sp.ARM]:
    """``(texts, bigram)``: the token texts ``[V]`` of the run's BPE and its bigram base, a
    table ARM on ``Lattice.markov(SequenceSpace(V, 32, eos=True), 1)`` whose homogeneous table
    ``[V+1, V+1]`` serves every length limit (``run_distortion``'s settings)."""
    settings = _SETTINGS[bool(quick)]
    text = stdlib_docstrings(settings["max_files"])[0]
    tokenizer = train_tokenizer(text, settings["vocab_size"])
    fit_space = sp.SequenceSpace(vocab_size=tokenizer.get_vocab_size(), length=32, eos=True)
    bigram = ngram_base(
        tokenizer, fit_space, 1, method=settings["method"], text=text,
        key=jax.random.key(seed), steps=_FIT_STEPS,
    )  # fmt: skip
    return token_texts(tokenizer), bigram


def run_distortion(out=None, *, quick: bool = False, seed: int = 0) -> list[dict]:
    """Decodes every constraint of ``SUITE`` with each of ``DECODERS`` and measures it exactly;
    writes the CSVs, ``distortion.md`` and the figures to ``out`` (a folder, created) unless
    None; returns one row per (constraint, decoder).

    Full run: a 256-token BPE on the docstrings of the first 300 stdlib files, the bigram fit by
    ``sp.fit`` (1,000 steps, key ``seed``), each constraint at its own ``length``. ``quick``:
    128 tokens, 30 files, the bigram from smoothed counts, length limit 20 everywhere.

    Returns:
        dicts with ``constraint``, ``decoder``, ``vocab_size``, ``length_limit``,
        ``num_states`` (reachable states of base × DFA), ``log_p_accepted``, ``kl_reverse``,
        ``kl_forward``, ``tv`` (NaN where only bounded), ``tv_low``, ``tv_high``,
        ``p_invalid``, ``p_length_limit``, ``expected_length``, ``target_expected_length``,
        ``per_position_kl`` (list), ``option_probabilities``, ``target_option_probabilities``
        (dicts, options only) and ``seconds`` (of the constraint's three decoders).
    """
    settings = _SETTINGS[bool(quick)]
    texts, bigram = suite_base(quick, seed)
    V = len(texts)
    rows = []
    for constraint in SUITE:
        started = time.perf_counter()
        length = settings["length"] or constraint.length
        space = sp.SequenceSpace(vocab_size=V, length=length, eos=True)
        dfa, option_states = constraint_lattice(constraint, space, texts)
        base = sp.ARM.from_table(sp.Lattice.markov(space, 1), bigram.params)
        results = distortion_reports(
            base, dfa, options=option_states, num_states=settings["num_states"]
        )
        seconds = time.perf_counter() - started
        for decoder in DECODERS:
            result = results[decoder]
            report = result.report
            rows.append({
                "constraint": constraint.name,
                "decoder": decoder,
                "vocab_size": V,
                "length_limit": length,
                "num_states": result.num_states,
                "log_p_accepted": report.log_p_accepted,
                "kl_reverse": report.kl_reverse,
                "kl_forward": report.kl_forward,
                "tv": np.nan if report.tv is None else report.tv,
                "tv_low": result.tv_low,
                "tv_high": result.tv_high,
                "p_invalid": report.p_invalid,
                "p_length_limit": report.p_length_limit,
                "expected_length": report.expected_length,
                "target_expected_length": report.target_expected_length,
                "per_position_kl": [float(v) for v in report.per_position_kl],
                "option_probabilities": dict(report.option_probabilities),
                "target_option_probabilities": dict(report.target_option_probabilities),
                "seconds": seconds,
            })  # fmt: skip
    if out is not None:
        _write(Path(out), rows, quick, seed, settings)
    return rows


def _write(out: Path, rows, quick, seed, settings) -> None:
    from seqppl.models.distortion_figures import distortion_figures

    out.mkdir(parents=True, exist_ok=True)
    write_csv(out, rows)
    header = (
        f"# Distortion of masking decoders ({'quick' if quick else 'full'} run, seed {seed})\n\n"
        f"BPE of {rows[0]['vocab_size']} tokens and a bigram ({settings['method']}) on the "
        f"docstrings of {settings['max_files']} stdlib files; exact figures (DP).\n\n"
    )
    lengths = {row["constraint"]: row["length_limit"] for row in rows}
    header += "".join(f"- {c.name} (L = {lengths[c.name]}): {c.what}\n" for c in SUITE)
    (out / "distortion.md").write_text(header + "\n" + distortion_markdown(rows))
    import matplotlib.pyplot as plt  # after distortion_figures chose the Agg backend

    for name, fig in distortion_figures(rows).items():
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


_SCALARS = (
    "constraint", "decoder", "vocab_size", "length_limit", "num_states", "log_p_accepted",
    "kl_reverse", "kl_forward", "tv", "tv_low", "tv_high", "p_invalid", "p_length_limit",
    "expected_length", "target_expected_length", "seconds",
)  # fmt: skip


def write_csv(out: Path, rows) -> None:
    """``out/distortion.csv`` (one line per row: the scalars, then ``p_option[o]`` and
    ``target_p_option[o]`` for each option) and ``out/distortion_per_position.csv``
    (``constraint, decoder, t, kl``)."""
    options = [o for row in rows for o in row["option_probabilities"]]
    options = list(dict.fromkeys(options))
    names = [*_SCALARS, *(f"p_option[{o}]" for o in options)]
    names += [f"target_p_option[{o}]" for o in options]
    with open(out / "distortion.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, names)
        writer.writeheader()
        for row in rows:
            line = {name: row[name] for name in _SCALARS}
            for o in row["option_probabilities"]:
                line[f"p_option[{o}]"] = row["option_probabilities"][o]
                line[f"target_p_option[{o}]"] = row["target_option_probabilities"][o]
            writer.writerow(line)
    with open(out / "distortion_per_position.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["constraint", "decoder", "t", "kl"])
        for row in rows:
            for t, kl in enumerate(row["per_position_kl"]):
                writer.writerow([row["constraint"], row["decoder"], t, kl])


def distortion_markdown(rows) -> str:
    """The markdown tables of ``rows``: every figure per (constraint, decoder), then the
    option probabilities (P(invalid) and TV bounds as in the CSV; ∞ where infinite)."""
    lines = [
        "| constraint | L | decoder | KL(decoder ‖ target) | KL(target ‖ decoder) | TV "
        "| P(invalid) | P(length limit) | mean length, decoder (target) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        tv = _number(row["tv"]) if np.isfinite(row["tv"]) else (
            f"[{_number(row['tv_low'])}, {_number(row['tv_high'])}]"
        )  # fmt: skip
        lines.append(
            f"| {row['constraint']} | {row['length_limit']} | {row['decoder']} "
            f"| {_number(row['kl_reverse'])} | {_number(row['kl_forward'])} | {tv} "
            f"| {_number(row['p_invalid'])} | {_number(row['p_length_limit'])} "
            f"| {row['expected_length']:.2f} ({row['target_expected_length']:.2f}) |"
        )
    with_options = [row for row in rows if row["option_probabilities"]]
    if with_options:
        options = list(with_options[0]["option_probabilities"])
        lines += ["", "| decoder | " + " | ".join(f"P({o})" for o in options) + " |"]
        lines.append("|---|" + "---|" * len(options))
        for row in with_options:
            cells = " | ".join(_number(row["option_probabilities"][o]) for o in options)
            lines.append(f"| {row['decoder']} | {cells} |")
    return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """``∞``, ``0`` (exactly), 3 significant digits, or 2 in scientific form below 10⁻³."""
    if value == np.inf:
        return "∞"
    if value == 0:
        return "0"
    return f"{value:.1e}" if abs(value) < 1e-3 else f"{value:.3g}"
