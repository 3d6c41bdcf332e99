"""``PartitionEstimate``: a log-partition estimate with its standard error, diagnostics and bounds.

Shared by the estimators (importance sampling, SMC): the normal interval on the log scale, the
EUBO ``E_{y~p_R}[R(y) − log q(y)] ≥ log Z`` from exact target samples
(docs/theory.md#variational-bounds), and the check that a proposal gives positive probability to
every sequence the EBM supports.
"""

from __future__ import annotations

import dataclasses
import functools
from statistics import NormalDist
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.checks import check_counts, check_key, check_model, refuse_invalid
from seqppl.diagnostics import plot_weights, weights_datatree
from seqppl.distributions import ARM, EBM
from seqppl.space import SMALL_SPACE

__all__ = [
    "PartitionEstimate",
    "DefensiveMixture",
    "check_sampler",
    "check_support",
    "check_proposal_covers",
    "exact_draws",
    "normal_interval",
    "normal_quantile",
    "mean_and_stderr",
    "rewards_and_log_q",
    "target_draws",
    "eubo",
]

TARGET_SAMPLES = 4096
"""Exact target samples drawn for the EUBO when ``target_samples="auto"`` and the EBM has them."""


class DefensiveMixture(NamedTuple):
    """The distribution importance draws come from: the proposal ARM ``q`` alone, or its
    defensive mixture ``(1 − α) q + α u`` with another ARM ``u`` (a pytree)."""

    arm: ARM
    defensive: ARM | None = None
    alpha: float = 0.0

    def log_prob(self, tokens) -> jax.Array:
        """``log q_α(y)`` ``[N]`` for tokens ``[N, T]``."""
        if self.defensive is None:
            return self.arm.log_prob(tokens)
        return jnp.logaddexp(
            jnp.log1p(-self.alpha) + self.arm.log_prob(tokens),
            jnp.log(self.alpha) + self.defensive.log_prob(tokens),
        )


@jax.jit
def rewards_and_log_q(ebm, proposal: DefensiveMixture, tokens):
    """``(R(y), log q(y))`` ``[N]`` for tokens ``[N, T]`` in one jitted call."""
    return ebm.unnormalized_log_prob(tokens), proposal.log_prob(tokens)


@dataclasses.dataclass(frozen=True)
class PartitionEstimate:
    """An estimate of ``log Z = log Σ_y exp R(y)`` with its uncertainty.

    Attributes:
        log_z: the estimate (``log`` of an unbiased estimate of ``Z`` for ``"is"``/``"smc"``).
        stderr: its standard error (delta method on the weights for IS; over independent SMC
            replicates for SMC; 0 for ``"exact"``).
        interval: ``log_z ± z_{(1+level)/2} · stderr`` (for SMC Student's ``t`` quantile with
            ``num_replicates − 1`` degrees of freedom: the spread of few replicates).
        ess: Kish effective sample size of the weights (NaN for ``"exact"``); for SMC the sum
            over replicates of the final weights' ESS (after resampling: not comparable with
            the ESS of IS).
        khat: Pareto k-hat from ArviZ's PSIS, fitted to the weights of the distinct draws
            (``diagnostics.sequence_khat``): IS draws, or SMC's pooled final weights
            ``Ẑ_r``-prefix × last weight, the terms of its pooled estimate, each distinct
            (replicate, sequence) once. NaN for ``"exact"``, and where no tail can be fitted,
            with the reason in ``khat_note``.
        elbo, elbo_stderr: a lower bound on ``log Z``: ``E_q[R − log q]`` for IS, the mean of
            the replicates' ``log Ẑ`` for SMC (Jensen); None for ``"exact"``.
        eubo, eubo_stderr: the upper bound ``E_{p_R}[R − log q]`` from exact or user-given
            target samples; None without them.
        num_samples: proposal draws (IS) or particles in all (SMC).
        method: ``"exact"``, ``"is"`` or ``"smc"``.
        level: the interval's coverage.
        log_weights, samples: kept weights ``[K]`` and sequences ``[K, T]`` (the first
            ``max_kept`` draws for IS, the final particles for SMC); None for ``"exact"``.
        messages: the diagnostic warnings raised while estimating.
        khat_note: why ``khat`` is NaN, or why a k-hat above its threshold did not warn (its
            Pareto tail carries under 5% of the estimate, ``diagnostics.tail_share``); else
            None.
        extras: method-specific figures (e.g. SMC's resampling count and ESS trace).
    """

    log_z: float
    stderr: float
    interval: tuple[float, float]
    ess: float
    khat: float
    elbo: float | None
    eubo: float | None
    num_samples: int
    method: str
    level: float = 0.95
    elbo_stderr: float | None = None
    eubo_stderr: float | None = None
    log_weights: np.ndarray | None = dataclasses.field(default=None, repr=False)
    samples: np.ndarray | None = dataclasses.field(default=None, repr=False)
    messages: tuple[str, ...] = ()
    khat_note: str | None = None
    extras: dict = dataclasses.field(default_factory=dict, repr=False)

    def __str__(self) -> str:
        if self.method == "exact":
            return f"log Z = {self.log_z:.6g} (exact)"
        low, high = self.interval
        khat = "n/a (see note)" if np.isnan(self.khat) else f"{self.khat:.3g}"
        text = (
            f"log Z ≈ {self.log_z:.6g} ± {self.stderr:.3g} ({self.method}, {self.num_samples} "
            f"samples; {100 * self.level:g}% interval [{low:.6g}, {high:.6g}]; ESS "
            f"{self.ess:.4g}; k-hat {khat})"
        )
        text += "".join(f"\n  warning: {m}" for m in self.messages)
        return text + (f"\n  note: {self.khat_note}" if self.khat_note else "")

    def attrs(self) -> dict:
        """The scalar fields as a flat dict (None and NaN kept as NaN), for files and tables,
        with the warnings: ``warnings`` (the ``messages``, one per line; ``""`` when none) and
        ``khat_note`` (``""`` when none), so a saved estimate keeps them."""
        out = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name == "interval":
                out["interval_low"], out["interval_high"] = (float(v) for v in value)
            elif field.name == "method":
                out[field.name] = value
            elif field.name == "messages":
                out["warnings"] = "\n".join(value)
            elif field.name == "khat_note":
                out[field.name] = value or ""
            elif field.name not in ("log_weights", "samples", "extras"):
                out[field.name] = float("nan") if value is None else float(value)
        return out

    def to_datatree(self):
        """An ArviZ ``DataTree``: the kept sequences in ``posterior.y``, their log weights in
        ``sample_stats.log_weight``, the scalar fields and the warnings in the root's ``attrs``
        (``attrs()``; they survive ``to_netcdf``)."""
        if self.samples is None:
            raise ValueError(f"a {self.method!r} estimate keeps no samples to export")
        return weights_datatree(self.samples, self.log_weights, self.attrs())

    def plot(self, ax=None):
        """The kept weights' histogram with k-hat (``diagnostics.plot_weights``); an ``Axes``.

        The title is the estimate, the legend its interval and sample count, and the warnings
        (``messages``) are a caption beneath the axes."""
        if self.log_weights is None:
            raise ValueError(f"a {self.method!r} estimate keeps no weights to plot")
        low, high = self.interval
        return plot_weights(
            self.log_weights,
            self.khat,
            f"{self.method}: log Z ≈ {self.log_z:.6g} ± {self.stderr:.3g}",
            ax,
            summary=(
                f"{100 * self.level:g}% interval [{low:.5g}, {high:.5g}]",
                f"{self.num_samples} samples, {self.log_weights.size} kept",
            ),
            caption=tuple(f"warning: {m}" for m in self.messages),
        )


def normal_interval(
    log_z: float, stderr: float, level: float, dof: int | None = None
) -> tuple[float, float]:
    """``log_z ± z_{(1+level)/2} · stderr``; with ``dof``, Student's ``t_{dof}`` quantile
    instead of the normal one (a mean of few replicates whose spread is itself estimated);
    ``(−∞, ∞)`` when either is not finite."""
    if not (np.isfinite(log_z) and np.isfinite(stderr)):
        return (-np.inf, np.inf)
    if dof is None:
        quantile = normal_quantile(level)
    else:
        from scipy.stats import t as student_t

        quantile = float(student_t.ppf(0.5 + level / 2, dof))
    half = quantile * stderr if stderr > 0 else 0.0
    return (log_z - half, log_z + half)


def normal_quantile(level: float) -> float:
    """``z_{(1+level)/2}``: the half-width of a central ``level`` normal interval in SDs."""
    return NormalDist().inv_cdf(0.5 + level / 2)


def mean_and_stderr(values) -> tuple[float, float]:
    """Mean and its standard error ``sd/√n`` of ``values`` ``[n]`` (−∞ in them: ``(−∞, NaN)``)."""
    values = np.asarray(values, np.float64)
    if np.any(values == -np.inf):
        return -np.inf, float("nan")
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def check_sampler(ebm, proposal, num_samples, key, max_kept) -> jax.Array:
    """Eager validation shared by the estimators (``ValueError``/``TypeError`` naming the
    argument); returns the key as a typed PRNG key."""
    if not isinstance(ebm, EBM):
        raise TypeError(f"ebm must be an EBM, got {type(ebm).__name__}")
    if ebm.batch_shape != ():
        raise ValueError(
            f"ebm has batch shape {ebm.batch_shape}; estimate one prompt at a time "
            "(index the prompts or loop over them)"
        )
    check_model(proposal, ARM, ebm, "proposal")
    check_counts(("num_samples", num_samples, 2), ("max_kept", max_kept, 1))
    return check_key(key)


def check_support(ebm, proposal: DefensiveMixture, tokens, what: str):
    """``(R, log q)`` ``[N]`` on ``tokens`` ``[N, T]``; raises if ``log q(y) = −∞`` where ``R(y)``
    is finite (importance weights would silently miss that mass) or if ``R`` is NaN/+∞."""
    rewards, log_q = (np.asarray(x) for x in rewards_and_log_q(ebm, proposal, tokens))
    refuse_invalid(rewards, "the EBM's reward", rows=tokens)
    missed = np.flatnonzero(np.isfinite(rewards) & (log_q == -np.inf))
    if missed.size:
        i = missed[0]
        raise ValueError(
            f"the proposal gives probability 0 to {what} {np.asarray(tokens[i]).tolist()}, which "
            f"the EBM supports (R = {rewards[i]:.4g}): the estimate would miss its mass; use a "
            "proposal that covers the EBM's support (e.g. defensive=0.1 for importance sampling)"
        )
    return rewards, log_q


def check_proposal_covers(ebm, proposal: DefensiveMixture) -> None:
    """Enumerates spaces up to ``SMALL_SPACE`` sequences for ``check_support``."""
    if ebm.space.num_sequences <= SMALL_SPACE:
        check_support(ebm, proposal, jnp.asarray(ebm.space.enumerate()), "the sequence")


@functools.partial(jax.jit, static_argnames="count")
def exact_draws(ebm, key, count: int):
    """``count`` exact draws and the exact ``log Z`` (the draws are void when it is −∞)."""
    return ebm.sample(key, (count,)), ebm.log_partition()


def target_draws(ebm, target_samples, count: int, key):
    """Exact target draws ``[M, T]`` or None, from ``target_samples``: ``"auto"`` (``count``
    exact draws with ``key`` when the EBM samples exactly: a lattice or an enumerable space;
    None otherwise or when no sequence has positive mass), None, or int ``[M >= 2, T]``
    sequences the caller knows are exact draws (validated)."""
    if target_samples is None:
        return None
    if isinstance(target_samples, str):
        if target_samples != "auto":
            raise ValueError(
                f"target_samples must be 'auto', None or sequences, got {target_samples!r}"
            )
        if not ebm.exact_route.is_exact:
            return None
        draws, log_z = exact_draws(ebm, key, count)
        return draws if np.isfinite(float(log_z)) else None
    draws = jnp.asarray(target_samples)
    if draws.ndim != 2 or draws.shape[0] < 2:
        raise ValueError(f"target_samples must be int [M >= 2, T], got shape {draws.shape}")
    ebm.space.validate(draws, "target_samples")
    return draws


def eubo(ebm, proposal: DefensiveMixture, target_samples, num_samples, key):
    """``(E_{p_R}[R − log q], its stderr)`` from target samples, or ``(None, None)``.

    ``target_samples``: ``"auto"`` (exact draws when the EBM samples exactly: a lattice or an
    enumerable space; drawn with ``key``, which must be independent of the estimator's),
    ``None`` (skip), or int ``[M, T]`` sequences the caller knows are exact
    draws from ``p_R``. Also checks ``log q > −∞`` on them (``check_support``)."""
    target_samples = target_draws(ebm, target_samples, min(num_samples, TARGET_SAMPLES), key)
    if target_samples is None:
        return None, None
    rewards, log_q = check_support(ebm, proposal, target_samples, "the target sample")
    excluded = np.flatnonzero(rewards == -np.inf)
    if excluded.size:
        raise ValueError(
            f"target_samples[{excluded[0]}] has R = -inf: it cannot be a draw from the EBM"
        )
    return mean_and_stderr(rewards - log_q)
