"""``DistillationReport``: how far an ARM is from a target EBM, as numbers, a DataTree and plots.

The fields are the quantities of docs/theory.md#distillation-error: both KLs with
intervals, TV, the per-position split of the reverse KL (the chain rule), the logit error ε and
the bound ``2T·ε``. ``seqppl.distillation_report.distillation_error`` computes them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from seqppl.diagnostics import add_caption, figure_axes
from seqppl.estimate import normal_quantile

__all__ = ["DistillationReport", "plot_distillation_history"]


@dataclasses.dataclass(frozen=True)
class DistillationReport:
    """The distillation error of an ARM ``p_q`` against an EBM ``p_R``
    (docs/theory.md#distillation-error).

    Attributes:
        kl_reverse, kl_forward: ``KL(p_q ‖ p_R)`` (the RL direction) and ``KL(p_R ‖ p_q)``.
        kl_reverse_interval, kl_forward_interval: ``level`` intervals (normal, clipped at 0;
            ``(v, v)`` in exact mode and for an infinite KL).
        kl_reverse_stderr, kl_forward_stderr: their standard errors (0 in exact mode).
        tv: total variation (exact mode; None in Monte Carlo mode).
        per_position_kl: ``[T]``, position t's ``E_{s_t ~ p_q} KL(π_q ‖ π_R)`` (sums to
            ``kl_reverse``); None when the target has no exact ARM (``notes`` says why).
        per_position_kl_stderr: ``[T]`` in Monte Carlo mode, zeros in exact mode.
        logit_error: ε, the largest half-range over states of the finite gaps ``M(r) − q``
            (∞ where exactly one of the two is −∞), over ``logit_error_scope``.
        bound: ``2T·ε``, an upper bound on both KLs (a lower estimate of it in Monte Carlo
            mode, where ε covers visited states only).
        logit_error_scope: ``"reachable states"`` (exact) or ``"visited states (lower
            estimate)"`` (Monte Carlo).
        method, level, horizon, num_samples: how the report was made.
        notes: the estimators used and why a figure is missing.
        extras: ``log_z``, ``log_z_stderr``, ``elbo``, ``eubo``, ``khat`` and ``ess`` of the
            student-as-proposal weights where they were computed.
    """

    kl_reverse: float
    kl_forward: float
    kl_reverse_interval: tuple[float, float]
    kl_forward_interval: tuple[float, float]
    kl_reverse_stderr: float
    kl_forward_stderr: float
    tv: float | None
    per_position_kl: np.ndarray | None
    per_position_kl_stderr: np.ndarray | None
    logit_error: float | None
    bound: float | None
    logit_error_scope: str
    method: str
    level: float
    horizon: int
    num_samples: int | None = None
    notes: tuple[str, ...] = ()
    extras: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_positions(
        cls, per_reverse, per_forward, logit_error: float, *, tv=None, level=0.95, notes=()
    ) -> DistillationReport:
        """An exact report from per-position KLs ``[T]`` (both directions, e.g. by dynamic
        programming) and the logit error ε: the KLs are their sums, every standard error 0,
        every interval a point, the bound ``2T·ε``."""
        per_reverse = np.asarray(per_reverse, np.float64)
        kl_reverse, kl_forward = float(per_reverse.sum()), float(np.sum(per_forward))
        return cls(
            kl_reverse=kl_reverse,
            kl_forward=kl_forward,
            kl_reverse_interval=(kl_reverse, kl_reverse),
            kl_forward_interval=(kl_forward, kl_forward),
            kl_reverse_stderr=0.0,
            kl_forward_stderr=0.0,
            tv=tv,
            per_position_kl=per_reverse,
            per_position_kl_stderr=np.zeros_like(per_reverse),
            logit_error=logit_error,
            bound=2 * per_reverse.size * logit_error,
            logit_error_scope="reachable states",
            method="exact",
            level=level,
            horizon=per_reverse.size,
            notes=tuple(notes),
        )

    def __str__(self) -> str:
        def interval(low, high):
            return f"[{low:.4g}, {high:.4g}]"

        lines = [
            f"distillation error ({self.method}, {100 * self.level:g}% intervals)",
            f"  KL(student ‖ target) = {self.kl_reverse:.6g} {interval(*self.kl_reverse_interval)}",
            f"  KL(target ‖ student) = {self.kl_forward:.6g} {interval(*self.kl_forward_interval)}",
        ]
        if self.tv is not None:
            lines.append(f"  TV = {self.tv:.6g}")
        if self.logit_error is not None:
            lines.append(
                f"  logit error ε = {self.logit_error:.6g} over {self.logit_error_scope}; "
                f"bound 2T·ε = {self.bound:.6g} (T = {self.horizon})"
            )
        if self.per_position_kl is not None:
            worst = int(np.argmax(self.per_position_kl))
            lines.append(
                f"  largest per-position KL at t = {worst}: {self.per_position_kl[worst]:.4g}"
            )
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def attrs(self) -> dict:
        """The scalar fields as a flat dict (None as NaN; intervals as ``*_low``/``*_high``;
        notes joined), ready for netCDF attributes and tables."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            name = field.name
            if name.endswith("_interval"):
                out[f"{name}_low"], out[f"{name}_high"] = (float(v) for v in value)
            elif name in ("method", "logit_error_scope"):
                out[name] = value
            elif name == "notes":
                out[name] = " | ".join(value)
            elif name == "extras":
                out.update({k: float("nan") if v is None else float(v) for k, v in value.items()})
            elif name not in ("per_position_kl", "per_position_kl_stderr"):
                out[name] = float("nan") if value is None else float(value)
        return out

    def to_datatree(self):
        """An ``xarray.DataTree``: the scalar fields in the root's ``attrs``; the group
        ``per_position`` holds ``kl`` and ``kl_stderr`` over ``position`` when available."""
        import xarray as xr

        tree = xr.DataTree()
        tree.attrs.update(self.attrs())
        if self.per_position_kl is not None:
            tree["per_position"] = xr.DataTree(
                xr.Dataset(
                    {
                        "kl": ("position", np.asarray(self.per_position_kl, np.float64)),
                        "kl_stderr": (
                            "position",
                            np.asarray(self.per_position_kl_stderr, np.float64),
                        ),
                    },
                    coords={"position": np.arange(self.horizon)},
                )
            )
        return tree

    def plot(self, ax=None, name: str = "student"):
        """Per-position KL of the model ``name`` with its intervals; an ``Axes``.

        The title is the total ``KL(name ‖ target)``; the bound ``2T·ε`` is a legend line, not
        drawn (it can be orders of magnitude above the KL:
        docs/theory.md#why-the-bound-is-loose)."""
        if self.per_position_kl is None:
            raise ValueError(f"no per-position KL to plot: {'; '.join(self.notes)}")
        ax, _ = figure_axes((6, 3.4), ax)
        kl = np.asarray(self.per_position_kl)
        half = normal_quantile(self.level) * np.asarray(self.per_position_kl_stderr)
        positions = np.arange(kl.size)
        handles = [
            ax.bar(positions, kl, color="tab:blue", alpha=0.8, label=f"{name}: E KL(π ‖ π_target)")
        ]
        if np.any(half > 0):
            ax.errorbar(positions, kl, yerr=half, fmt="none", color="black", capsize=2)
        if self.bound is not None:
            label = f"bound 2T·ε = {self.bound:.3g} (loose, not drawn)"
            handles += ax.plot([], [], " ", label=label)
        ax.margins(y=0.3)  # room above the bars for the legend
        title = f"KL({name} ‖ target) = {self.kl_reverse:.3g}"
        ax.set(xlabel="position t", ylabel="KL (nats)", title=title)
        ax.legend(handles=handles, loc="upper left", frameon=False, fontsize="small")
        return ax


def plot_distillation_history(history, ax=None):
    """The reverse KL over training with its interval band, and the bound ``2T·ε`` where the
    history has it (``distill``'s history with evaluation); an ``Axes``.

    The bound is a grey dashed line on the same log scale, with a caption: it holds, but it is
    loose (often orders of magnitude above the KL)."""
    if "kl_reverse" not in history:
        raise ValueError("history has no 'kl_reverse': run distill with evaluate= set")
    ax, own = figure_axes((6, 3.4), ax)
    step = np.asarray(history["step"])
    kl = np.asarray(history["kl_reverse"], np.float64)
    ax.plot(step, kl, color="tab:blue", label="KL(student ‖ target)")
    if "kl_reverse_low" in history:
        ax.fill_between(
            step, history["kl_reverse_low"], history["kl_reverse_high"], alpha=0.3, lw=0
        )
    ax.set(
        xlabel="step", ylabel="KL (nats)", yscale="log", title="KL(student ‖ target) in training"
    )
    if "bound" in history:
        bound = np.asarray(history["bound"], np.float64)
        ax.plot(step, bound, color="0.5", ls="--", lw=1, label="bound 2T·ε (loose)")
        ratio = bound[-1] / kl[-1] if kl[-1] > 0 else np.inf
        add_caption(
            ax,
            [f"The bound 2T·ε holds but is loose: {ratio:.3g}× the final KL."],
            grow=own,
            color="0.3",
        )
    ax.legend(frameon=False, fontsize="small")
    return ax
