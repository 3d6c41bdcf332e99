"""Importance-weight diagnostics through ArviZ: Pareto k-hat, Kish ESS, warnings, DataTrees, plots.

Pareto k-hat is ArviZ's PSIS (``arviz_stats``), called with the negated log weights as its
docstring requires. The sample-size threshold is ``min(1 − 1/log10 S, 0.7)`` (Vehtari et al.,
Pareto smoothed importance sampling, 2024): above it the estimate's error is not controlled.
Depends only on external libraries and numpy (DESIGN.md layers).
"""

from __future__ import annotations

import warnings

import numpy as np

__all__ = [
    "EstimateWarning",
    "pareto_khat",
    "sequence_khat",
    "tail_share",
    "tail_note",
    "TAIL_SHARE",
    "khat_threshold",
    "kish_ess",
    "weight_warnings",
    "weights_datatree",
    "plot_weights",
    "figure_axes",
    "add_caption",
    "MIN_KHAT_SAMPLES",
]

MIN_KHAT_SAMPLES = 100
"""Below this many weights k-hat is itself too noisy to trust."""
TAIL_SHARE = 0.05
"""Smallest share of the estimate its Pareto tail must carry for a high k-hat to warn."""
MIN_TAIL_WEIGHTS = 25
"""Fewest finite weights for which PSIS has a tail of 5 to fit."""


class EstimateWarning(UserWarning):
    """An estimate's diagnostics say it should not be trusted (k-hat, ESS, zero weights)."""


def pareto_khat(log_weights) -> float:
    """Pareto k-hat of importance weights ``exp(log_weights)`` ``[S]`` from ArviZ's PSIS.

    NaN when there is no tail to fit (fewer than 25 finite weights: PSIS fits the largest
    ``min(S/5, 3√S)``, at least 5; or a tail of equal
    weights, as when a tiny space repeats its sequences). ``k < 0.5``: finite variance;
    ``k > 0.7``: the estimate is unreliable whatever ``S``.

    >>> import numpy as np
    >>> w = np.random.default_rng(0).pareto(1.0, 20000) + 1  # tail index 1: k = 1
    >>> round(pareto_khat(np.log(w)), 1)
    1.0
    """
    from arviz_stats.base import array_stats

    log_weights = np.asarray(log_weights, np.float64).reshape(-1)
    finite = log_weights[np.isfinite(log_weights)]
    if finite.size < MIN_TAIL_WEIGHTS or np.ptp(finite) == 0:
        return float("nan")
    try:
        _, khat = array_stats.psislw(-finite)
    except ValueError as error:  # arviz_stats: "All tail values are the same"
        if "same" not in str(error):
            raise
        return float("nan")
    return float(khat)


def sequence_khat(log_weights, sequences, groups=None) -> tuple[float, str | None]:
    """Pareto k-hat of importance weights on sequences, and why it is NaN (None when it is not).

    A sequence drawn ``n`` times contributes ``n`` equal weights: atoms, which PSIS's continuous
    generalised-Pareto fit is not built for (a tie at the top of the tail makes it NaN, a
    frequent heavy sequence inflates it, though its contribution ``n·w/S`` is then well
    estimated). The fit is made on the distinct draws instead: each distinct sequence (within
    its group: SMC's replicate) once, so the tail describes the weights of the sequences the
    proposal reached, not how often it repeated them. On continuous-like spaces, where no
    sequence repeats, this is PSIS on every weight. docs/partition.md gives the calibration.

    Args:
        log_weights: ``[S]`` log importance weights.
        sequences: int ``[S, T]``, the draws behind them.
        groups: optional int ``[S]`` (e.g. the replicate of each SMC particle).

    Returns:
        ``(k-hat, None)``, or ``(NaN, reason)`` when there is no tail to fit.
    """
    distinct, _ = _distinct(log_weights, sequences, groups)
    distinct = distinct[np.isfinite(distinct)]
    if distinct.size < MIN_TAIL_WEIGHTS:
        return float("nan"), (
            f"k-hat not computed: {distinct.size} distinct sequences with positive weight were "
            f"drawn; PSIS needs at least {MIN_TAIL_WEIGHTS}"
        )
    khat = pareto_khat(distinct)
    if np.isnan(khat):
        return khat, (
            "k-hat not computed: the largest weights of the distinct sequences are all equal "
            "(the proposal is proportional to the target on them)"
        )
    return khat, None


def tail_share(log_weights, sequences, groups=None) -> float:
    """The share of ``Σ w`` carried by the draws of the distinct sequences in the Pareto tail
    that ``sequence_khat`` fits (the largest ``min(D/5, 3√D)`` of ``D`` distinct weights, each
    with its multiplicity). A k-hat above its threshold with a small share (below
    ``TAIL_SHARE``) describes bounded weights whose top values spread out, not a tail that
    carries the estimate: ``weight_warnings`` does not warn then (docs/partition.md)."""
    distinct, counts = _distinct(log_weights, sequences, groups)
    finite = np.isfinite(distinct)
    distinct, counts = distinct[finite], counts[finite]
    if distinct.size == 0:
        return 0.0
    size = max(int(min(distinct.size / 5, 3 * np.sqrt(distinct.size))), 1)
    mass = counts * np.exp(distinct - distinct.max())
    return float(mass[np.argsort(-distinct)[:size]].sum() / mass.sum())


def _distinct(log_weights, sequences, groups):
    """``(log w [D], multiplicity [D])`` of the distinct (group, sequence) rows, in draw order."""
    log_weights = np.asarray(log_weights, np.float64).reshape(-1)
    rows = np.asarray(sequences).reshape(log_weights.size, -1)
    if groups is not None:
        rows = np.concatenate([np.asarray(groups).reshape(-1, 1), rows], axis=1)
    _, first, counts = np.unique(rows, axis=0, return_index=True, return_counts=True)
    order = np.argsort(first)
    return log_weights[first[order]], counts[order]


def khat_threshold(num_samples: int) -> float:
    """``min(1 − 1/log10 S, 0.7)``: the largest k-hat at which ``S`` samples still suffice."""
    return float(min(1.0 - 1.0 / np.log10(max(num_samples, 11)), 0.7))


def kish_ess(log_weights) -> float:
    """Kish's effective sample size ``(Σ w)² / Σ w²`` of ``exp(log_weights)`` (0 if all zero)."""
    log_weights = np.asarray(log_weights, np.float64).reshape(-1)
    top = np.max(log_weights) if log_weights.size else -np.inf
    if not np.isfinite(top):
        return 0.0
    w = np.exp(log_weights - top)
    return float(w.sum() ** 2 / np.sum(w * w))


def weight_warnings(
    khat: float,
    ess: float,
    num_samples: int,
    min_ess_fraction: float,
    what: str,
    share: float = 1.0,
) -> list[str]:
    """The diagnostic messages for ``S = num_samples`` weights; each is also issued as an
    ``EstimateWarning``. Empty when the diagnostics raise no concern. ``share``: the Pareto
    tail's share of the estimate (``tail_share``); k-hat warns only from ``TAIL_SHARE``."""
    messages = []
    if np.isfinite(khat):
        if khat > khat_threshold(num_samples) and share >= TAIL_SHARE:
            messages.append(
                f"{what}: Pareto k-hat {khat:.2f} exceeds {khat_threshold(num_samples):.2f}, the "
                f"threshold for {num_samples} samples: the weights are heavy-tailed and the "
                "estimate and its standard error are unreliable; use a closer proposal"
            )
        if num_samples < MIN_KHAT_SAMPLES:
            messages.append(
                f"{what}: k-hat from {num_samples} < {MIN_KHAT_SAMPLES} weights is unreliable"
            )
    if ess == 0:
        messages.append(f"{what}: every weight is zero; log Z is -inf or the proposal misses it")
    elif ess < min_ess_fraction * num_samples:
        messages.append(
            f"{what}: effective sample size {ess:.1f} is below {min_ess_fraction:g} of the "
            f"{num_samples} samples"
        )
    for message in messages:
        warnings.warn(message, EstimateWarning, stacklevel=3)
    return messages


def tail_note(khat: float, share: float, num_samples: int) -> str | None:
    """Why a k-hat above its threshold did not warn (its tail carries less than
    ``TAIL_SHARE`` of the estimate), else None."""
    if not (np.isfinite(khat) and khat > khat_threshold(num_samples) and share < TAIL_SHARE):
        return None
    return (
        f"k-hat {khat:.2f} is above its threshold {khat_threshold(num_samples):.2f}, but its "
        f"Pareto tail carries {100 * share:.1f}% of the estimate (under {100 * TAIL_SHARE:g}%): "
        "bounded weights whose largest values spread out, not a tail the estimate rests on; "
        "no warning (docs/partition.md)"
    )


def weights_datatree(tokens, log_weights, attrs: dict):
    """An ArviZ ``DataTree``: ``posterior.y`` ``(chain=1, draw, position)`` holds the kept
    sequences, ``sample_stats.log_weight`` ``(chain=1, draw)`` their log weights; ``attrs``
    (numbers and strings) go on the root."""
    from arviz_base import from_dict

    tree = from_dict(
        {
            "posterior": {"y": np.asarray(tokens)[None]},
            "sample_stats": {"log_weight": np.asarray(log_weights, np.float64)[None]},
        },
        dims={"y": ["position"]},
    )
    tree.attrs.update(attrs)
    return tree


def plot_weights(
    log_weights, khat: float, title: str = "importance weights", ax=None, summary=(), caption=()
):
    """Histogram of the normalised log weights ``log(w / max w)``; returns the ``Axes``.

    The legend holds k-hat with its threshold, the Kish ESS and the ``summary`` lines; each
    ``caption`` line (e.g. the estimate's warnings) is wrapped beneath the axes (``add_caption``).
    Keep ``title`` short: it is drawn on one line.
    """
    log_weights = np.asarray(log_weights, np.float64).reshape(-1)
    finite = log_weights[np.isfinite(log_weights)]
    ax, own = figure_axes((5.5, 3.4), ax)
    if finite.size:
        counts, _, _ = ax.hist(finite - finite.max(), bins=60, color="tab:blue", alpha=0.8)
        ax.set_ylim(0.5, 30 * max(counts.max(), 1))  # room above the bars for the legend
    limit = khat_threshold(log_weights.size)
    ax.set(xlabel="log w − max log w", ylabel="count", yscale="log", title=title)
    ax.plot([], [], " ", label=f"k-hat {khat:.2f} (threshold {limit:.2f})")
    ax.plot([], [], " ", label=f"Kish ESS {kish_ess(log_weights):.0f} of {log_weights.size}")
    for line in summary:
        ax.plot([], [], " ", label=line)
    ax.legend(loc="upper left", frameon=False, fontsize="small")
    if caption:
        add_caption(ax, caption, grow=own, color="darkred")
    return ax


def figure_axes(size: tuple[float, float], ax=None):
    """``(ax, False)``, or ``(new Axes, True)`` on a ``size`` (inches) figure whose layout is
    ``"constrained"``, so that titles, axis labels and captions stay inside the canvas."""
    if ax is not None:
        return ax, False
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=size, layout="constrained")
    return ax, True


def add_caption(ax, lines, grow: bool = False, fontsize: float = 8, **text_kw):
    """Writes ``lines`` (strings) beneath ``ax``'s x label, each wrapped to the axes' width;
    returns the text artist.

    A constrained layout (``figure_axes``) makes room for it inside the canvas; ``grow=True``
    also makes the figure taller by the caption's height, so the axes keep their size.
    """
    import textwrap

    fig = ax.figure
    width = ax.get_position().width * fig.get_figwidth()  # inches, before the layout widens it
    chars = max(int(width * 72 / (0.55 * fontsize)), 20)  # 0.55 em: a wide average glyph
    text = "\n".join(textwrap.fill(line, chars) for line in lines)
    if grow:
        fig.set_figheight(fig.get_figheight() + (text.count("\n") + 1.5) * 1.25 * fontsize / 72)
    return ax.annotate(
        text,
        xy=(0, 0),
        xycoords=("axes fraction", ax.xaxis.label),
        xytext=(0, -0.5 * fontsize),
        textcoords="offset points",
        ha="left",
        va="top",
        fontsize=fontsize,
        **text_kw,
    )
