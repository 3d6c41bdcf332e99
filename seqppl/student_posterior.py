"""Uncertainty about a distillation error across students: ensembles or posterior draws.

A student trained from other seeds (a deep ensemble), or drawn from a posterior over its
parameters, has another distillation error. ``distillation_posterior`` collects the reports of
several such students per configuration (size, objective) into an ArviZ ``DataTree`` whose
``posterior`` group has one draw per student, so ``arviz_stats.summary`` and
``arviz_plots.plot_forest`` compare configurations side by side. ``student_summary`` separates
the two sources of spread: the Monte Carlo error of each report and the spread between students,
``Var(observed) = Var(between students) + mean(stderr²)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from seqppl.checks import check_choice
from seqppl.report import DistillationReport

__all__ = ["distillation_posterior", "student_summary", "METRICS"]

METRICS = ("kl_reverse", "kl_forward")


def distillation_posterior(reports: Mapping[str, Sequence[DistillationReport]]):
    """An ArviZ ``DataTree`` of the distillation errors of several students per configuration.

    Args:
        reports: ``{configuration name: [report of each student]}``, the same number of
            students for every configuration.

    Returns:
        a ``DataTree``: ``posterior`` holds ``kl_reverse`` and ``kl_forward`` with dims
        ``(chain=1, draw=student, configuration)``; ``sample_stats`` holds their standard
        errors ``kl_reverse_stderr`` and ``kl_forward_stderr`` (0 for exact reports).
    """
    from arviz_base import from_dict

    if not reports:
        raise ValueError("reports is empty: give {configuration: [reports]}")
    counts = {name: len(group) for name, group in reports.items()}
    if len(set(counts.values())) != 1 or min(counts.values()) < 2:
        raise ValueError(
            f"every configuration needs the same number (>= 2) of students, got {counts}"
        )
    for name, group in reports.items():
        if not all(isinstance(r, DistillationReport) for r in group):
            raise TypeError(f"reports[{name!r}] must hold DistillationReport objects")
    names = list(reports)

    def stack(field):  # [chain=1, draw, configuration]
        return np.array([[getattr(r, field) for r in reports[n]] for n in names]).T[None]

    dims = {name: ["configuration"] for name in METRICS}
    dims.update({f"{name}_stderr": ["configuration"] for name in METRICS})
    return from_dict(
        {
            "posterior": {name: stack(name) for name in METRICS},
            "sample_stats": {f"{name}_stderr": stack(f"{name}_stderr") for name in METRICS},
        },
        dims=dims,
        coords={"configuration": names},
    )


def student_summary(tree, metric: str = "kl_reverse"):
    """Per configuration: ``mean``, ``sd`` (observed spread over students), ``mc_sd`` (root
    mean square of the reports' standard errors) and ``between_sd`` (``√max(0, sd² − mc_sd²)``,
    the spread that Monte Carlo error does not explain); a pandas ``DataFrame``."""
    import pandas as pd

    metric = check_choice("metric", metric, METRICS)
    values = tree["posterior"][metric]
    stderr = tree["sample_stats"][f"{metric}_stderr"]
    rows = {}
    for name in values["configuration"].values:
        draws = values.sel(configuration=name).values.reshape(-1)
        errors = stderr.sel(configuration=name).values.reshape(-1)
        sd = float(draws.std(ddof=1))
        mc_sd = float(np.sqrt(np.mean(errors**2)))
        rows[str(name)] = {
            "mean": float(draws.mean()),
            "sd": sd,
            "mc_sd": mc_sd,
            "between_sd": float(np.sqrt(max(0.0, sd**2 - mc_sd**2))),
            "students": draws.size,
        }
    return pd.DataFrame.from_dict(rows, orient="index")
