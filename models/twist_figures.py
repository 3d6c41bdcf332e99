"""The figures and the measured statement of ``benchmarks/twist_scaling.py`` (docs/twisted_smc.md),
from its cells: ``{"case/sampler/P": {"runs": [metrics per seed], "pooled": {...}}}``.

- ``scaling_figures``: per enumerable case TV, KL(p̂ ‖ p), missing mass, the log Z error, ESS per
  particle and the runaway rate against P (means over seeds with 95% bands); per other case the
  pooled log Z with its interval, ESS per particle and the runaway rate;
- ``particle_ratio``: how many times fewer particles a sampler needs to reach a reference
  sampler's TV at the reference's largest P, with a bootstrap interval over seeds;
- ``summary_markdown``: the tables and the statement.
"""

from __future__ import annotations

import numpy as np

from seqppl.diagnostics import add_caption

__all__ = [
    "SAMPLERS",
    "LABELS",
    "TWISTED",
    "curves",
    "finite_mean",
    "particle_ratio",
    "scaling_figures",
    "summary_markdown",
]

SAMPLERS = ("exact", "is", "smc", "smc_lattice", "smc_lookahead", "smc_learned")
LABELS = {
    "exact": "exact draws (reference)",
    "is": "IS",
    "smc": "SMC, no twist",
    "smc_lattice": "SMC, lattice twist",
    "smc_lookahead": "SMC, lattice values on the base",
    "smc_learned": "SMC, learned twist",
}
TWISTED = ("smc_lattice", "smc_lookahead", "smc_learned")
COLOURS = {
    "exact": "0.45",
    "is": "tab:purple",
    "smc": "tab:red",
    "smc_lattice": "tab:blue",
    "smc_lookahead": "tab:green",
    "smc_learned": "tab:orange",
}


def _by_cell(cells: dict, case: str) -> dict:
    """``{sampler: {P: cell}}`` for one case."""
    out = {}
    for name, cell in cells.items():
        c, sampler, particles = name.split("/")
        if c == case:
            out.setdefault(sampler, {})[int(particles)] = cell
    return out


def curves(cells: dict, case: str, metric: str) -> dict:
    """``{sampler: (grid [G], values [R, G])}``: one metric per seed along the grid."""
    out = {}
    for sampler, by_p in _by_cell(cells, case).items():
        grid = np.array(sorted(by_p))
        values = [[run.get(metric, np.nan) for run in by_p[p]["runs"]] for p in grid]
        out[sampler] = (grid, np.array(values, np.float64).T)
    return out


def finite_mean(values, axis=None):
    """``(mean, standard error, count)`` over the finite entries along ``axis`` (NaN where
    there are none; a standard error needs two), without numpy's empty-slice warnings."""
    values = np.asarray(values, np.float64)
    finite = np.isfinite(values)
    count = finite.sum(axis)
    total = np.where(finite, values, 0.0).sum(axis)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    centred = np.where(
        finite, values - np.expand_dims(mean, axis) if axis is not None else values - mean, 0.0
    )
    var = (centred**2).sum(axis) / np.maximum(count - 1, 1)
    se = np.where(count > 1, np.sqrt(var / np.maximum(count, 1)), np.nan)
    return mean, se, count


def _crossing(grid, curve, level) -> tuple[float, int]:
    """``(P, censored)``: where the mean ``curve`` first reaches ``level`` (log-linear between
    grid points); censored −1 when it is there at the first point, +1 when never."""
    below = np.flatnonzero(curve <= level)
    if below.size == 0:
        return float(grid[-1]), 1
    g = below[0]
    if g == 0:
        return float(grid[0]), -1
    x0, x1 = np.log(grid[g - 1]), np.log(grid[g])
    y0, y1 = curve[g - 1], curve[g]
    return float(np.exp(x0 + (y0 - level) / (y0 - y1) * (x1 - x0))), 0


def particle_ratio(cells, case, sampler, reference="smc", metric="tv", boots=2000, seed=0):
    """``P_max / P*`` with ``P*`` where ``sampler``'s mean ``metric`` reaches the reference's
    mean at its largest ``P_max``: ``{ratio, low, high, level, particles, censored,
    share_censored}`` (95% percentile bootstrap, seeds resampled within each sampler).

    ``censored`` −1: reached at the grid's first point (the ratio is a lower bound), +1: not
    reached within the grid (an upper bound, ``P_max / P_max``)."""
    data = curves(cells, case, metric)
    (grid_ref, ref), (grid, values) = data[reference], data[sampler]
    rng = np.random.default_rng(seed)

    def one(ref_rows, rows):
        level = finite_mean(ref_rows[:, -1])[0]
        particles, censored = _crossing(grid, finite_mean(rows, 0)[0], level)
        return grid_ref[-1] / particles, censored, level, particles

    ratio, censored, level, particles = one(ref, values)
    draws = [
        one(
            ref[rng.integers(0, len(ref), len(ref))],
            values[rng.integers(0, len(values), len(values))],
        )
        for _ in range(boots)
    ]
    ratios = np.array([d[0] for d in draws])
    return {
        "ratio": ratio,
        "low": float(np.percentile(ratios, 2.5)),
        "high": float(np.percentile(ratios, 97.5)),
        "level": level,
        "particles": particles,
        "censored": censored,
        "share_censored": float(np.mean([d[1] != 0 for d in draws])),
        "reference_particles": int(grid_ref[-1]),
    }


def _band(ax, grid, values, colour, label, dashed=False):
    """Mean over seeds with a 95% band (± 1.96 standard errors over the seeds that have it)."""
    mean, se, _ = finite_mean(values, 0)
    se = np.where(np.isfinite(se), se, 0.0)
    style = "--" if dashed else "-"
    if ax.get_yscale() == "log":  # a mean of 0 (no run accepted anything) has no point
        mean = np.where(mean > 0, mean, np.nan)
    ax.plot(grid, mean, style, marker="o", ms=3, color=colour, label=label)
    ax.fill_between(grid, mean - 1.96 * se, mean + 1.96 * se, color=colour, alpha=0.18, lw=0)


def _pooled(cells, case):
    """``{sampler: (grid, log_z, low, high)}`` of the cells' pooled estimates."""
    out = {}
    for sampler, by_p in _by_cell(cells, case).items():
        grid = np.array(sorted(by_p))
        rows = [by_p[p]["pooled"] for p in grid]
        out[sampler] = (
            grid,
            *(np.array([r[k] for r in rows], float) for k in ("log_z", "low", "high")),
        )
    return out


def _intervals(ax, i, sampler, grid, centre, low, high):
    """Points with their intervals where all three are finite, offset by sampler along x."""
    shown = np.isfinite(centre) & np.isfinite(low) & np.isfinite(high)
    centre, low, high = centre[shown], low[shown], high[shown]
    ax.errorbar(
        grid[shown] * 1.06 ** (i - 2),
        centre,
        np.vstack([centre - low, high - centre]),
        fmt="o",
        ms=3,
        capsize=2,
        color=COLOURS[sampler],
        label=LABELS[sampler],
    )


def _order(samplers):
    return [s for s in SAMPLERS if s in samplers]


def _legend(fig, axes):
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=8, frameon=False)


def enumerable_figure(cells, case, context, seeds):
    """Six panels against P (log x): TV, KL(p̂ ‖ p), missing mass, the pooled log Z error
    with its interval, ESS per particle, the runaway rate."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(11.5, 7.6), layout="constrained")
    panels = [
        ("tv", "TV(p̂, p)", "linear"),
        ("kl_rev", "KL(p̂ ‖ p) (nats)", "linear"),
        ("missing", "target mass outside p̂", "linear"),
        (None, "pooled log Ẑ − log Z", "linear"),
        ("ess", "ESS / P of the final weights", "log"),
        ("runaway", "runaway share of final particles", "linear"),
    ]
    pooled = _pooled(cells, case)
    for ax, (metric, label, scale) in zip(axes.flat, panels, strict=True):
        ax.set_yscale(scale)
        if metric is None:
            samplers = _order(pooled)
            for i, sampler in enumerate(s for s in samplers if s != "exact"):
                grid, log_z, low, high = pooled[sampler]
                shift = context["log_z"]
                _intervals(ax, i, sampler, grid, log_z - shift, low - shift, high - shift)
            ax.axhline(0, color="0.3", lw=0.8)
        else:
            data = curves(cells, case, metric)
            for sampler in _order(data):
                grid, values = data[sampler]
                _band(ax, grid, values, COLOURS[sampler], LABELS[sampler], sampler == "exact")
        ax.set_xscale("log")
        ax.set_xlabel("particles per run P")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    fig.suptitle(f"{case}: {context['pattern']}, exact log Z = {context['log_z']:.3f}", fontsize=10)
    add_caption(
        axes.flat[3],
        [
            f"Means over {seeds} seeds with 95% bands (± 1.96 se); KL(p̂ ‖ p) over the runs "
            "with a non-empty p̂. p̂: one run's weighted final particles; KL(p ‖ p̂) is ∞ while "
            "the missing mass is positive. Error bars: the pooled 95% interval; a pooled "
            "log Ẑ = −∞ (no particle accepted) is not drawn."
        ],
    )
    return fig


def interval_figure(cells, case, context, seeds):
    """Three panels against P: the pooled log Ẑ with its 95% interval, ESS per particle and
    the runaway rate; the bigram × DFA's exact log P as a reference line."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(11.5, 4.4), layout="constrained")
    pooled = _pooled(cells, case)
    for i, sampler in enumerate(_order(pooled)):
        _intervals(axes[0], i, sampler, *pooled[sampler])
    axes[0].axhline(context["approx_log_z"], color="0.4", ls=":", lw=1)
    axes[0].set_ylabel("log Ẑ, pooled over seeds (95% interval)")
    axes[1].set_yscale("log")
    for ax, metric, label in (
        (axes[1], "ess", "ESS / P of the final weights"),
        (axes[2], "runaway", "runaway share of final particles"),
    ):
        data = curves(cells, case, metric)
        for sampler in _order(data):
            grid, values = data[sampler]
            _band(ax, grid, values, COLOURS[sampler], LABELS[sampler])
        ax.set_ylabel(label)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xlabel("particles per run P")
        ax.grid(alpha=0.3)
    _legend(fig, axes)
    fig.suptitle(f"{case}: {context['pattern']} (no exact answer)", fontsize=10)
    add_caption(
        axes[0],
        [
            f"Each point pools {seeds} runs of P particles (IS: P·{seeds} draws); dotted: the "
            "bigram × DFA's exact log P, the approximation behind the lattice twists. Points "
            "with every weight 0 are not drawn."
        ],
    )
    return fig


def scaling_figures(cells, settings, context) -> dict:
    """``{file name: Figure}``, one per case (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    figures = {}
    for case, spec in settings["cases"].items():
        info = {**context[case], "pattern": spec["pattern"]}
        build = enumerable_figure if spec["enumerable"] else interval_figure
        figures[f"twist-scaling-{case}.png"] = build(cells, case, info, settings["seeds"])
    return figures


def _number(x, digits=3):
    return "−∞" if x == -np.inf else ("∞" if x == np.inf else f"{x:.{digits}g}")


def statement(cells, case, sampler, reference="smc") -> str:
    """One sentence: the particle ratio of ``sampler`` against ``reference`` on TV."""
    r = particle_ratio(cells, case, sampler, reference)
    name, ref = LABELS[sampler], LABELS[reference]
    head = f"{name} reaches the TV of {ref} at P = {r['reference_particles']:,} ({r['level']:.3f})"
    interval = f"95% bootstrap interval over seeds {r['low']:.2g}–{r['high']:.2g}"
    if r["censored"] < 0:
        return (
            f"{head} already at the grid's first point P = {r['particles']:.0f}: at least "
            f"{r['ratio']:.3g}× fewer particles ({interval})."
        )
    if r["censored"] > 0:
        return f"{head} nowhere in the grid (its largest P included) ({interval})."
    return (
        f"{head} at P ≈ {r['particles']:,.0f}: {r['ratio']:.2g}× fewer particles "
        f"({interval}; {100 * r['share_censored']:.0f}% of resamples censored)."
    )


def summary_markdown(cells, settings, context, machine: str) -> str:
    """The per-cell tables (means over seeds) and the statements, as markdown."""
    lines = [f"Machine: {machine}; {settings['seeds']} seeds per cell.", ""]
    for case, spec in settings["cases"].items():
        info = context[case]
        lines += [
            f"### {case}: `{spec['pattern']}`, words of at most {spec['length']} characters",
            "",
        ]
        if "log_z" in info:
            lines.append(
                f"Exact log Z = {info['log_z']:.4f} over {info['accepted']:,} accepted "
                f"sequences; bigram × DFA log P = {info['approx_log_z']:.4f}."
            )
        else:
            lines.append(f"No exact answer; bigram × DFA log P = {info['approx_log_z']:.4f}.")
        metrics = ["tv", "kl_rev", "missing"] if spec["enumerable"] else []
        metrics += ["ess", "runaway", "accepted"]
        lines += [
            "",
            "| sampler | P | " + " | ".join(metrics) + " | pooled log Ẑ (95% interval) | s |",
            "|---|---|" + "---|" * (len(metrics) + 2),
        ]
        by = _by_cell(cells, case)
        for sampler in _order(by):
            for p, cell in sorted(by[sampler].items()):
                means = [finite_mean([run[m] for run in cell["runs"]])[0] for m in metrics]
                pooled = cell["pooled"]
                estimate = (
                    f"{_number(pooled['log_z'], 4)} [{_number(pooled['low'], 4)}, "
                    f"{_number(pooled['high'], 4)}]"
                )
                lines.append(
                    f"| {LABELS[sampler]} | {p:,} | "
                    + " | ".join(_number(m) for m in means)
                    + f" | {estimate} | {cell['seconds']:.1f} |"
                )
        if spec["enumerable"] and "smc" in by:
            lines += ["", "Measured:", ""]
            lines += [f"- {statement(cells, case, s)}" for s in TWISTED if s in by]
        lines.append("")
    return "\n".join(lines)
