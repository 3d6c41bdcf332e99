"""What a distillation error does downstream: one NumPyro model, two sequence distributions.

``compare_posteriors`` runs NUTS on the same model twice, once with the target (usually the EBM
the model writes at a sequence site) and once with an approximation (an ARM) at that site, and
compares the two posteriors parameter by parameter (mean shift in posterior standard deviations,
overlap of central intervals) and by their expected log predictive densities (PSIS-LOO through
``arviz_stats.compare``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from numpyro.distributions import Distribution, ExpandedDistribution, MaskedDistribution
from numpyro.infer import MCMC, NUTS
from numpyro.primitives import Messenger

from seqppl.checks import check_key, check_level

__all__ = ["PosteriorComparison", "compare_posteriors", "replace_site"]


class replace_site(Messenger):
    """A NumPyro handler that swaps the distribution of the sample site ``site``.

    ``replacement`` is a ``Distribution`` used as is, or a callable ``f(dist) -> Distribution``
    applied to the distribution the model built there (with the current parameter values);
    a plate's expansion is kept (the replacement is expanded to the same batch shape).
    """

    def __init__(self, fn=None, site=None, replacement=None):
        self.site, self.replacement = site, replacement
        super().__init__(fn)

    def process_message(self, msg):
        """Swap ``msg["fn"]`` at the named sample site (NumPyro's handler protocol)."""
        if msg["type"] != "sample" or msg["name"] != self.site:
            return
        fn = msg["fn"]
        batch = fn.batch_shape
        masks = []  # peel plate expansions and masks, put the masks back on the replacement
        base = fn
        while isinstance(base, (ExpandedDistribution, MaskedDistribution)):
            if isinstance(base, MaskedDistribution):
                masks.append(base._mask)
            base = base.base_dist
        if isinstance(self.replacement, Distribution):
            new = self.replacement
        else:
            new = self.replacement(base)
            if not isinstance(new, Distribution):
                raise TypeError(
                    f"the replacement for site {self.site!r} returned "
                    f"{type(new).__name__}, not a Distribution"
                )
        new = new.expand(batch) if new.batch_shape != batch else new
        for mask in reversed(masks):
            new = new.mask(mask)
        msg["fn"] = new


@dataclasses.dataclass(frozen=True)
class PosteriorComparison:
    """Two posteriors of one model and how they differ.

    Attributes:
        target, approx: ArviZ ``DataTree``s (posterior, sample_stats, log_likelihood,
            observed_data) of the runs with each distribution at the site.
        parameters: a pandas ``DataFrame``, one row per scalar parameter: ``target_mean``,
            ``target_sd``, ``approx_mean``, ``approx_sd``, ``shift_sd`` (``(approx_mean −
            target_mean) / target_sd``), ``overlap`` (length of the intersection over the union
            of the two central ``level`` intervals; 1 = the same interval) and ``mcse_shift``
            (the Monte Carlo standard error of ``shift_sd`` from both runs' ESS, so a shift can
            be told apart from sampling noise).
        loo: ``arviz_stats.compare`` of the two (``elpd_diff`` and its ``dse``), or None when
            PSIS-LOO cannot be computed (``loo_error`` says why: e.g. a site whose
            log-likelihood does not depend on the parameters has equal weights' tails).
        level: the interval coverage.
    """

    target: object
    approx: object
    parameters: object
    loo: object
    level: float
    loo_error: str | None = None

    @property
    def max_abs_shift(self) -> float:
        """The largest ``|shift_sd|`` over parameters."""
        return float(np.max(np.abs(self.parameters["shift_sd"].to_numpy())))

    def __str__(self) -> str:
        return (
            f"posterior comparison ({100 * self.level:g}% central intervals)\n"
            f"{self.parameters.to_string(float_format=lambda v: f'{v:.3f}')}\n"
            + (
                f"LOO:\n{self.loo.to_string()}"
                if self.loo is not None
                else f"LOO: {self.loo_error}"
            )
        )


def compare_posteriors(
    model,
    data: dict,
    *,
    site: str,
    approx,
    target=None,
    key,
    num_warmup: int = 500,
    num_samples: int = 500,
    num_chains: int = 2,
    level: float = 0.94,
    progress: bool = False,
) -> PosteriorComparison:
    """Run ``model(**data)`` with ``target`` and with ``approx`` at ``site``; compare posteriors.

    Args:
        model: a NumPyro model with an observed sequence site named ``site``.
        data: keyword arguments of ``model`` (observed sequences included).
        site: the sample site whose distribution is swapped.
        approx: the approximation at the site: an ARM (or any ``Distribution``), or a callable
            ``f(dist_at_site) -> Distribution`` (e.g. ``sp.to_arm``, or a student family).
        target: the same for the target run; None keeps the model's own distribution.
        key: a PRNG key (both runs use it: common random numbers).
        num_warmup, num_samples, num_chains: NUTS settings (chains run sequentially).
        level: the central interval's coverage for ``overlap``.

    Returns:
        a ``PosteriorComparison``.
    """
    import arviz_base
    import arviz_stats
    import pandas as pd

    if not isinstance(site, str):
        raise TypeError(f"site must be a site name (str), got {type(site).__name__}")
    if not isinstance(data, dict):
        raise TypeError(f"data must be a dict of model keyword arguments, got {type(data)}")
    level = check_level(level)
    key = check_key(key)
    trees = {}
    for name, replacement in (("target", target), ("approx", approx)):
        run = model if replacement is None else replace_site(model, site, replacement)
        _check_site(run, data, site, key)
        mcmc = MCMC(
            NUTS(run),
            num_warmup=num_warmup,
            num_samples=num_samples,
            num_chains=num_chains,
            chain_method="sequential",
            progress_bar=progress,
        )
        mcmc.run(key, **data)
        trees[name] = arviz_base.from_numpyro(mcmc, log_likelihood=True)
    rows = []
    for var, target_draws in _scalar_draws(trees["target"]).items():
        approx_draws = _scalar_draws(trees["approx"])[var]
        rows.append(_compare_draws(var, target_draws, approx_draws, level, arviz_stats))
    parameters = pd.DataFrame(rows).set_index("parameter")
    try:
        loo, loo_error = arviz_stats.compare(trees), None
    except ValueError as error:  # e.g. a log-likelihood that does not vary over the draws
        cause = f" ({error.__cause__})" if error.__cause__ is not None else ""
        loo, loo_error = None, f"{error}{cause}"
    return PosteriorComparison(trees["target"], trees["approx"], parameters, loo, level, loo_error)


def _check_site(model, data, site, key):
    """The site exists and is observed (``ValueError`` naming the sites otherwise)."""
    from numpyro import handlers

    trace = handlers.trace(handlers.seed(model, key)).get_trace(**data)
    sites = [name for name, msg in trace.items() if msg["type"] == "sample"]
    if site not in sites:
        raise ValueError(f"site {site!r} is not a sample site of the model (sites: {sites})")
    if not trace[site]["is_observed"]:
        raise ValueError(f"site {site!r} must be observed (give its sequences in data)")


def _scalar_draws(tree) -> dict:
    """``{name: draws [chain, draw]}`` for every scalar component of every posterior variable."""
    out = {}
    for var, array in tree["posterior"].data_vars.items():
        values = np.asarray(array.values)
        flat = values.reshape(*values.shape[:2], -1)
        for i in range(flat.shape[-1]):
            index = np.unravel_index(i, values.shape[2:]) if values.ndim > 2 else ()
            name = var + ("[" + ",".join(map(str, index)) + "]" if index else "")
            out[name] = flat[..., i]
    return out


def _compare_draws(name, target, approx, level, arviz_stats) -> dict:
    low_t, high_t = np.quantile(target, [(1 - level) / 2, (1 + level) / 2])
    low_a, high_a = np.quantile(approx, [(1 - level) / 2, (1 + level) / 2])
    inter = max(0.0, min(high_t, high_a) - max(low_t, low_a))
    union = max(high_t, high_a) - min(low_t, low_a)
    sd_t = float(target.std())
    ess_t = float(arviz_stats.ess(target))
    ess_a = float(arviz_stats.ess(approx))
    mcse = np.sqrt(target.var() / ess_t + approx.var() / ess_a) / sd_t
    return {
        "parameter": name,
        "target_mean": float(target.mean()),
        "target_sd": sd_t,
        "approx_mean": float(approx.mean()),
        "approx_sd": float(approx.std()),
        "shift_sd": float((approx.mean() - target.mean()) / sd_t),
        "mcse_shift": float(mcse),
        "overlap": inter / union if union > 0 else 1.0,
    }
