"""The distortion benchmark's figures, from ``run_distortion``'s rows (``models.distortion``).

``distortion_per_position.png``: each decoder's per-position ``KL(decoder ‖ target)``, one
panel per constraint (∞ where the decoder steps off the target's support); ``distortion_
runaway.png``: P(length limit without accepting) per constraint and decoder; ``distortion_
options.png``: the option probabilities of the masking decoders against the exact conditional.
"""

from __future__ import annotations

import numpy as np

from seqppl.diagnostics import add_caption, figure_axes

__all__ = [
    "distortion_figures",
    "per_position_figure",
    "runaway_figure",
    "options_figure",
    "COLOURS",
]

COLOURS = {"myopic": "tab:red", "feasible": "tab:orange", "exact": "tab:green"}
"""One colour per decoder, the same in every figure."""


def distortion_figures(rows) -> dict:
    """The figures by file name (Agg backend): per-position KL, runaway rate and, when a row
    has options, the option probabilities."""
    import matplotlib

    matplotlib.use("Agg")
    figures = {
        "distortion_per_position.png": per_position_figure(rows),
        "distortion_runaway.png": runaway_figure(rows).figure,
    }
    if any(row["option_probabilities"] for row in rows):
        figures["distortion_options.png"] = options_figure(rows).figure
    return figures


def _constraints(rows) -> list[str]:
    return list(dict.fromkeys(row["constraint"] for row in rows))


def per_position_figure(rows):
    """One panel per constraint: ``KL(decoder ‖ target)`` at each position t for each decoder,
    a triangle at the top where it is ∞; a ``Figure`` with one legend beneath the panels."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = _constraints(rows)
    fig, axes = plt.subplots(
        1, len(names), figsize=(3.2 * len(names), 3.8), layout="constrained", squeeze=False
    )
    handles = {}
    for ax, name in zip(axes[0], names, strict=True):
        for row in (r for r in rows if r["constraint"] == name):
            kl = np.asarray(row["per_position_kl"], np.float64)
            t = np.arange(kl.size)
            finite = np.isfinite(kl)
            colour = COLOURS.get(row["decoder"], "tab:blue")
            wide = row["decoder"] == "myopic"  # drawn first and wider: visible beneath feasible
            (line,) = ax.plot(
                t, np.where(finite, kl, np.nan), "o-", ms=3, lw=4 if wide else 1.5,
                alpha=0.5 if wide else 1.0, color=colour, label=row["decoder"],
            )  # fmt: skip
            handles.setdefault(row["decoder"], line)
            (marks,) = ax.plot(
                t[~finite], np.full((~finite).sum(), 0.95), "^", color=colour, ms=6,
                transform=ax.get_xaxis_transform(), label="∞ (a token no accepted text follows)",
            )  # fmt: skip
            if (~finite).any():
                handles.setdefault("∞", marks)
        ax.margins(y=0.15)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set(xlabel="position t", ylabel="KL (nats)", title=f"{name} (L = {row['length_limit']})")
    fig.legend(
        handles=list(handles.values()), loc="outside lower center", ncols=len(handles),
        frameon=False, fontsize="small",
    )  # fmt: skip
    fig.suptitle("Per-position KL(decoder ‖ exact conditional); myopic and feasible overlap")
    return fig


def _bars(ax, labels, groups: dict, ylabel: str, title: str):
    """Grouped bars: ``groups`` maps a decoder to one value per label; values written above."""
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(labels))
    for k, (decoder, values) in enumerate(groups.items()):
        offset = (k - (len(groups) - 1) / 2) * width
        bars = ax.bar(x + offset, values, width, color=COLOURS.get(decoder), label=decoder)
        text = [f"{v:.2g}" if v >= 0.005 or v == 0 else f"{v:.0e}" for v in values]
        ax.bar_label(bars, text, fontsize=7, padding=1)
    ax.set_xticks(x, labels)
    ax.set_ylim(0, 1.15 * max(1e-9, *(max(v) for v in groups.values())))
    ax.set(ylabel=ylabel, title=title)
    ax.legend(frameon=False, fontsize="small", loc="upper right")


def runaway_figure(rows, ax=None):
    """P(the response reaches the length limit unaccepted) per constraint and decoder, with
    P(invalid) beside it in the caption; an ``Axes``."""
    ax, own = figure_axes((7.5, 3.6), ax)
    names = _constraints(rows)
    decoders = list(dict.fromkeys(row["decoder"] for row in rows))
    value = {(r["constraint"], r["decoder"]): r["p_length_limit"] for r in rows}
    groups = {d: [value.get((n, d), 0.0) for n in names] for d in decoders}
    _bars(ax, names, groups, "P(length limit, not accepted)", "Runaway rate")
    ax.set_xlabel("constraint")
    add_caption(
        ax,
        [
            "Myopic masking only forbids dead tokens: it may pad or nest until the length "
            "limit and then emit an invalid EOS. Feasible masking and the exact decoder never do."
        ],
        grow=own,
        color="0.3",
    )
    return ax


def options_figure(rows, ax=None):
    """The probability of each option under each decoder (the exact one is the base's own
    ratio of the options); an ``Axes``."""
    ax, own = figure_axes((6.5, 3.6), ax)
    with_options = [row for row in rows if row["option_probabilities"]]
    options = list(with_options[0]["option_probabilities"])
    groups = {r["decoder"]: [r["option_probabilities"][o] for o in options] for r in with_options}
    _bars(
        ax,
        options,
        groups,
        "P(output spells the option)",
        "Option probabilities (first-token bias)",
    )
    ax.set_xlabel("option")
    add_caption(
        ax,
        [
            "Masking decoders choose the first token, and each after it, by the base's "
            "next-token probability among those that can still spell an option, blind to how "
            "probable each option is as a whole; the exact decoder weighs each option by its "
            "whole probability under the base."
        ],
        grow=own,
        color="0.3",
    )
    return ax
