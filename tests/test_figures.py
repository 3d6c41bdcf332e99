"""Every figure seqppl writes fits its canvas and says what it shows.

Each figure is built from tiny fabricated inputs (no sampling, no training), rendered with Agg,
and every visible text (titles, axis labels, drawn tick labels, legends, captions, the suptitle)
must lie inside the figure, within a pixel. The demo's and the paper reproduction's figures come
from the builders ``seqppl.models.demo`` and ``seqppl.models.paper`` call before saving.
"""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.axis import Axis  # noqa: E402
from matplotlib.legend import Legend  # noqa: E402
from matplotlib.offsetbox import OffsetBox  # noqa: E402
from matplotlib.text import Text  # noqa: E402

import seqppl as sp  # noqa: E402
from seqppl.diagnostics import plot_weights  # noqa: E402

LONG_WARNING = (
    "importance sampling: Pareto k-hat 0.93 exceeds 0.70, the threshold for 5000 samples: the "
    "weights are heavy-tailed and the estimate and its standard error are unreliable; use a "
    "closer proposal"
)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def outside(fig, tolerance: float = 1.0) -> list[str]:
    """The visible artists of ``fig`` whose rendered extent leaves the canvas (pixels)."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox

    def check(name, box):
        if box is None or box.width == 0 and box.height == 0:
            return []
        out = (
            box.x0 < canvas.x0 - tolerance
            or box.y0 < canvas.y0 - tolerance
            or box.x1 > canvas.x1 + tolerance
            or box.y1 > canvas.y1 + tolerance
        )
        return [f"{name}: {np.round(box.extents, 1)} outside {canvas.extents}"] if out else []

    def artists(parent, where):
        for child in parent.get_children():
            if not child.get_visible():
                continue
            if isinstance(child, Text) and child.get_text().strip():
                yield f"{where} text {child.get_text()[:60]!r}", child.get_window_extent(renderer)
            elif isinstance(child, Axis):  # the drawn tick labels, the axis label, offset text
                yield f"{where} {child.axis_name} axis", child.get_tightbbox(renderer)
            elif isinstance(child, Legend | OffsetBox):
                yield f"{where} {type(child).__name__}", child.get_window_extent(renderer)

    problems = []
    for name, box in artists(fig, "figure"):
        problems += check(name, box)
    for i, ax in enumerate(fig.axes):
        where = f"axes {i} ({ax.get_title()[:40]!r})"
        for name, box in artists(ax, where):
            problems += check(name, box)
        problems += check(f"{where} as a whole", ax.get_tightbbox(renderer))
    return problems


def texts(fig) -> str:
    """Every string drawn on ``fig``, joined (titles, labels, legends, captions)."""
    return "\n".join(t.get_text() for t in fig.findobj(Text))


def _estimate(messages=()):
    rng = np.random.default_rng(0)
    log_weights = -rng.gamma(2.0, 1.0, 300)
    return sp.PartitionEstimate(
        log_z=-0.894,
        stderr=0.0067,
        interval=(-0.907, -0.881),
        ess=287.0,
        khat=0.93 if messages else 0.36,
        elbo=-0.95,
        eubo=-0.85,
        num_samples=300,
        method="is",
        log_weights=log_weights,
        samples=np.zeros((300, 7), np.int32),
        messages=tuple(messages),
    )


def _report(kl, bound=41.1, horizon=7):
    shares = np.array([0.1, 0.05, 0.08, 0.1, 0.6, 0.07, 0.0])[:horizon]
    per_position = kl * shares / shares.sum()
    return sp.DistillationReport(
        kl_reverse=kl,
        kl_forward=1.3 * kl,
        kl_reverse_interval=(kl, kl),
        kl_forward_interval=(1.3 * kl, 1.3 * kl),
        kl_reverse_stderr=0.0,
        kl_forward_stderr=0.0,
        tv=0.2,
        per_position_kl=per_position,
        per_position_kl_stderr=np.zeros(horizon),
        logit_error=bound / (2 * horizon),
        bound=bound,
        logit_error_scope="reachable states",
        method="exact",
        level=0.95,
        horizon=horizon,
    )


def _history(steps=11, bound=41.0):
    step = np.arange(0, 10 * steps, 10)
    kl = 0.55 * np.exp(-step / 50) + 0.05
    return {
        "step": step,
        "kl_reverse": kl,
        "kl_reverse_low": 0.9 * kl,
        "kl_reverse_high": 1.1 * kl,
        "bound": np.full(steps, bound),
    }


@pytest.mark.parametrize("messages", [(), (LONG_WARNING, "is: k-hat from 300 < 1000 weights")])
def test_weights_figure_fits_and_carries_its_warnings(messages):
    """The estimate and its warnings are a caption, not a title running off both edges."""
    estimate = _estimate(messages)
    fig = estimate.plot().figure
    assert not outside(fig)
    drawn = " ".join(texts(fig).split())
    assert "-0.894" in drawn  # the estimate itself is on the figure
    for message in messages:
        assert " ".join(message.split()) in drawn
    assert len(fig.axes[0].get_title()) <= 60


def test_plot_weights_alone_and_with_nan_khat():
    rng = np.random.default_rng(1)
    fig = plot_weights(-rng.gamma(2.0, 1.0, 50), float("nan")).figure
    assert not outside(fig)


def test_report_plot_fits_and_names_its_model():
    report = _report(0.0818)
    fig = report.plot(name="constrained decoder").figure
    assert not outside(fig)
    ax = fig.axes[0]
    assert "constrained decoder" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "bound" not in ax.get_title()  # the loose bound is no headline
    assert not outside(report.plot().figure)  # default name, own figure


def test_history_plot_fits_and_draws_the_bound_as_a_loose_secondary_line():
    fig = sp.plot_distillation_history(_history()).figure
    assert not outside(fig)
    ax = fig.axes[0]
    (bound,) = [line for line in ax.get_lines() if "bound" in line.get_label()]
    assert bound.get_linestyle() == "--"
    assert matplotlib.colors.to_hex(bound.get_color()) == matplotlib.colors.to_hex("0.5")
    assert "bound" not in ax.get_title()
    assert "loose" in texts(fig)
    low, high = ax.get_ylim()
    history = _history()
    assert low <= history["kl_reverse_low"].min() and high >= history["bound"].max()


def test_history_plot_without_a_bound():
    history = {k: v for k, v in _history().items() if k != "bound"}
    fig = sp.plot_distillation_history(history).figure
    assert not outside(fig) and "loose" not in texts(fig)


def test_demo_figures_fit_and_compare_on_one_scale():
    from seqppl.models import demo

    figures = demo.demo_figures(
        _report(0.551), _report(0.0818), _history(), _estimate([LONG_WARNING])
    )
    assert set(figures) == {"distillation.png", "is_weights.png"}
    for name, fig in figures.items():
        assert not outside(fig), name
    constrained, student, history = figures["distillation.png"].axes
    for ax, name in ((constrained, "constrained"), (student, "student")):
        legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
        assert name in legend and name in ax.get_title()
    assert constrained.get_shared_y_axes().joined(constrained, student)
    assert "loose" in texts(figures["distillation.png"])


def test_demo_report_carries_the_estimate_warnings():
    from seqppl.models import demo

    rows = [("log Z (IS, student proposal)", "-0.894 ± 0.0067")]
    text = demo.report_markdown("# demo\n", rows, _report(0.551), _report(0.0818), _estimate())
    assert "warning" not in text.lower()
    estimate = _estimate([LONG_WARNING, "is: k-hat from 300 < 1000 weights"])
    text = demo.report_markdown("# demo\n", rows, _report(0.551), _report(0.0818), estimate)
    for message in estimate.messages:
        assert message in text
    table_end = text.index("| log Z (IS, student proposal)")
    assert text.index(LONG_WARNING) < text.index("## Per-position")  # next to the numbers
    assert table_end < text.index(LONG_WARNING)


def test_paper_panels_fit():
    from seqppl.models import paper

    steps = np.arange(0, 50, 10)
    decay = np.exp(-steps / 20)
    result = {
        "step": steps,
        "arm_gap": decay,
        "ebm_gap": 2 * decay,
        "before_map": 3 * decay,
        "after_map": decay,
        "kl": 0.01 * decay,
        "bound": 8 * decay,
    }
    settings = dict(config="v0", target="zipf", steps=50, lr=1e-3, adam_b2=0.99, seed=0)
    fig = paper.panels_figure(result, settings)
    assert not outside(fig)
    left, right = fig.axes
    assert left.get_ylabel() and right.get_ylabel()  # different quantities, each axis says which


def test_student_forest_fits():
    """The forest plot examples/student_posterior.py saves (ArviZ's own figure)."""
    arviz_plots = pytest.importorskip("arviz_plots", reason="the example's forest plot")
    reports = {
        "unigram": [_report(0.3), _report(0.32), _report(0.29)],
        "task lattice": [_report(0.1), _report(0.12), _report(0.09)],
    }
    tree = sp.distillation_posterior(reports)
    arviz_plots.plot_forest(tree, var_names=["kl_reverse", "kl_forward"])
    (number,) = plt.get_fignums()
    assert not outside(plt.figure(number))


def _distortion_rows():
    """Rows shaped like run_distortion's: two constraints, three decoders, ∞ per-position KL
    for myopic masking, options on the second."""
    rows = []
    for name, horizon in (("json", 12), ("options", 6)):
        for decoder in ("myopic", "feasible", "exact"):
            kl = np.zeros(horizon) if decoder == "exact" else np.linspace(0.1, 2.5, horizon)
            if decoder == "myopic" and name == "json":
                kl[8:] = np.inf
            options = {}
            if name == "options":
                options = {"skill": 0.32, "sky": 0.37, "skip": 0.05, "cloud": 0.26}
                if decoder == "exact":
                    options = {"skill": 0.002, "sky": 0.978, "skip": 0.0002, "cloud": 0.02}
            rows.append({
                "constraint": name,
                "decoder": decoder,
                "length_limit": horizon - 1,
                "per_position_kl": list(kl),
                "p_length_limit": 1.0 if (decoder, name) == ("myopic", "json") else 0.0,
                "option_probabilities": options,
            })  # fmt: skip
    return rows


def test_distortion_figures_fit_and_mark_infinite_kl():
    from seqppl.models.distortion_figures import distortion_figures

    figures = distortion_figures(_distortion_rows())
    assert set(figures) == {
        "distortion_per_position.png",
        "distortion_runaway.png",
        "distortion_options.png",
    }
    for name, fig in figures.items():
        assert not outside(fig), name
        for ax in fig.axes:
            assert ax.get_xlabel() and ax.get_ylabel(), name
    per_position = figures["distortion_per_position.png"]
    assert [ax.get_title() for ax in per_position.axes] == ["json (L = 11)", "options (L = 5)"]
    assert "∞" in texts(per_position)  # the legend says what the triangles are
    for name in ("distortion_runaway.png", "distortion_options.png"):
        labels = {t.get_text() for t in figures[name].axes[0].get_legend().get_texts()}
        assert labels == {"myopic", "feasible", "exact"}, name
    assert "first token" in texts(figures["distortion_options.png"])


def _twist_cells():
    """Fabricated cells of benchmarks/twist_scaling.py: both cases, every sampler, with the
    awkward values the study produces (no accepted particle: −∞, NaN KL, zero ESS)."""
    from seqppl.models.twist_figures import SAMPLERS

    rng = np.random.default_rng(0)
    cells = {}
    for case, grid in (("enumerable", [10, 100, 1000]), ("long", [10, 1000])):
        for i, sampler in enumerate(SAMPLERS):
            if case == "long" and sampler == "exact":
                continue
            for p in grid:
                empty = sampler in ("is", "smc") and p == 10
                runs = [
                    {
                        "tv": 1.0 if empty else 0.9 - 0.1 * i * np.log10(p) / 3 + 0.01 * r,
                        "kl_rev": np.nan if empty else 3.0 / np.log10(10 * p),
                        "missing": 1.0 if empty else 0.8 - 0.05 * i,
                        "ess": 0.0 if empty else 10.0 ** -rng.uniform(0, 2),
                        "runaway": 0.09 if i < 3 else 0.01,
                        "accepted": 0.0 if empty else 0.5,
                        "log_z_error": -np.inf if empty else rng.normal(0, 0.2),
                    }
                    for r in range(4)
                ]
                log_z = -np.inf if empty else -5.4 + rng.normal(0, 0.1)
                pooled = {"log_z": log_z, "stderr": 0.1, "low": log_z - 0.2, "high": log_z + 0.2}
                cells[f"{case}/{sampler}/{p}"] = {"runs": runs, "pooled": pooled, "seconds": 1.0}
    settings = {
        "seeds": 4,
        "cases": {
            "enumerable": {"length": 10, "pattern": "[A-Z]{2,4}", "enumerable": True},
            "long": {"length": 16, "pattern": "[A-Z][a-z]+(?:[A-Z][a-z]+)+", "enumerable": False},
        },
    }
    context = {
        "enumerable": {"log_z": -5.42, "approx_log_z": -5.99, "accepted": 475228},
        "long": {"approx_log_z": -6.1},
    }
    return cells, settings, context


def test_twist_scaling_figures_fit_and_say_what_they_show():
    from seqppl.models.twist_figures import LABELS, scaling_figures, summary_markdown

    cells, settings, context = _twist_cells()
    figures = scaling_figures(cells, settings, context)
    assert set(figures) == {"twist-scaling-enumerable.png", "twist-scaling-long.png"}
    for name, fig in figures.items():
        assert not outside(fig), name
        drawn = texts(fig)
        assert "particles per run P" in drawn and "seeds" in drawn
        assert all(ax.get_xscale() == "log" for ax in fig.axes)
    legend = texts(figures["twist-scaling-enumerable.png"])
    assert all(label in legend for label in LABELS.values())
    summary = summary_markdown(cells, settings, context, "test machine")
    assert "Measured:" in summary and "fewer particles" in summary
