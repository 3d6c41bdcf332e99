"""``distillation_error``: how far an ARM is from a target EBM (docs/theory.md#distillation-error):
both KLs, TV, the per-position split of the reverse KL, the logit error ε and the bound ``2T·ε``.

Exact mode enumerates the space, or, when it is too large and both models are table ARMs (the
target's exact ARM and the student), runs a dynamic program on their lattices. Monte Carlo mode
draws from the student (and from the target when it samples exactly) and gives normal intervals
from the ELBO/EUBO sandwich:
``KL(p_q ‖ p_R) = log Z − E_q[R − log q]`` and ``KL(p_R ‖ p_q) = E_{p_R}[R − log q] − log Z``.
When the target has an exact ARM (a lattice EBM, or an enumerable space) the reverse KL is the
chain rule's Rao–Blackwellised sum ``Σ_t E_{s_t ~ p_q} KL(π_q(·|s_t) ‖ π_R(·|s_t))``, which also
gives the per-position split.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.bellman import occupancy
from seqppl.checks import (
    check_choice,
    check_counts,
    check_key,
    check_level,
    check_model,
    refuse_invalid,
)
from seqppl.diagnostics import kish_ess, sequence_khat
from seqppl.distributions import ARM, EBM, to_arm
from seqppl.distributions.convert import no_exact_arm_reason
from seqppl.distributions.support import map_in_chunks
from seqppl.estimate import (
    DefensiveMixture,
    mean_and_stderr,
    normal_interval,
    rewards_and_log_q,
    target_draws,
)
from seqppl.logspace import categorical_kl, softmax
from seqppl.partition import log_partition
from seqppl.report import DistillationReport
from seqppl.space import ENUMERATION_CHUNK, MAX_ENUMERATE

__all__ = [
    "distillation_error",
    "path_terms",
    "half_range_gap",
    "occupancy_terms",
    "REPORT_METHODS",
]

REPORT_METHODS = ("exact", "mc")
"""``distillation_error``'s modes; ``"mc"`` (Monte Carlo) is canonical, ``"is"`` is accepted."""


def distillation_error(
    ebm,
    arm,
    method: str = "exact",
    *,
    num_samples: int = 4096,
    key=None,
    level: float = 0.95,
    target_samples="auto",
) -> DistillationReport:
    """The distillation error of ``arm`` (the student ``p_q``) against ``ebm`` (``p_R``).

    Args:
        ebm: the target ``EBM`` (batch shape ``()``).
        arm: the student ``ARM`` over the same space and prompt.
        method: ``"exact"`` (enumerates the space; ``MAX_ENUMERATE`` sequences at most; needs an
            exact ``log Z``) or ``"mc"`` (Monte Carlo; ``"is"`` is accepted for it).
        num_samples: Monte Carlo: student draws, and exact target draws for the forward KL.
        key: Monte Carlo: a PRNG key (``jax.random.key(n)`` or ``jax.random.PRNGKey(n)``).
        level: interval coverage.
        target_samples: Monte Carlo: ``"auto"`` (exact draws when the EBM is a lattice or the
            space is enumerable), None, or int ``[M, T]`` exact draws of the target. Without
            them the forward KL is self-normalised importance sampling with the student as
            proposal (biased; labelled in ``notes``).

    Returns:
        a ``DistillationReport``. The per-position split and ε need the target's next-token
        policy ``M(r)`` (``to_arm``): available for lattice EBMs and enumerable spaces.

    Raises:
        TypeError / ValueError: bad arguments (a student over another space or prompt, an
            unknown method, a space too large for ``"exact"``).
    """
    if not isinstance(ebm, EBM):
        raise TypeError(f"ebm must be an EBM, got {type(ebm).__name__}")
    if ebm.batch_shape != ():
        raise ValueError(f"ebm has batch shape {ebm.batch_shape}; report one prompt at a time")
    check_model(arm, ARM, ebm, "arm")
    level = check_level(level)
    method = check_choice("method", method, REPORT_METHODS, {"is": "mc"})
    teacher, reason = _teacher(ebm)
    if method == "exact":
        return _exact(ebm, arm, teacher, reason, level)
    check_counts(("num_samples", num_samples, 2))
    key = check_key(key, "key= (method='mc' needs it)")
    return _monte_carlo(ebm, arm, teacher, reason, num_samples, key, level, target_samples)


# -- exact mode -------------------------------------------------------------------------------


def _exact(ebm, arm, teacher, reason, level) -> DistillationReport:
    space = ebm.space
    if ebm.log_partition_source != "exact":
        raise ValueError("method='exact' needs the EBM's exact log Z, not an attached estimate")
    if space.num_sequences > MAX_ENUMERATE:
        if teacher is None or arm.lattice is None or arm.batch_shape:
            raise ValueError(
                f"method='exact' enumerates the space, which has {space.num_sequences} "
                f"sequences (more than {MAX_ENUMERATE}), unless the target has an exact ARM "
                "and the arm is one table ARM (a dynamic program); use method='mc' with key="
            )
        return _exact_on_lattices(arm, teacher, level)
    seqs = jnp.asarray(space.enumerate())
    log_p, log_q = (np.asarray(x, np.float64) for x in _log_probs(ebm, arm, seqs))
    refuse_invalid(log_p, "ebm.log_prob(y)", rows=seqs)
    refuse_invalid(log_q, "arm.log_prob(y)", rows=seqs)
    kl_reverse = float(categorical_kl(log_q, log_p, 0))
    kl_forward = float(categorical_kl(log_p, log_q, 0))
    tv = 0.5 * float(np.sum(np.abs(np.exp(log_p) - np.exp(log_q))))
    per_position = logit_error = bound = None
    notes = [] if teacher is not None else [reason]
    if teacher is not None:
        kl_t, eps_t = (np.asarray(x, np.float64) for x in _path_terms_chunked(arm, teacher, seqs))
        refuse_invalid(kl_t + eps_t, "the arm's next-token KL", rows=seqs, allow_pos_inf=True)
        supported = (log_q > -np.inf)[:, None]  # 0 · ∞ = 0 off the student's support only
        with np.errstate(invalid="ignore"):
            weighted = np.where(kl_t == np.inf, np.inf, np.exp(log_q)[:, None] * kl_t)
        per_position = np.where(supported, weighted, 0).sum(0)
        reachable = (log_p > -np.inf) | (log_q > -np.inf)
        logit_error = float(eps_t[reachable].max()) if reachable.any() else 0.0
        bound = 2 * space.horizon * logit_error
    zeros = None if per_position is None else np.zeros_like(per_position)
    return DistillationReport(
        kl_reverse=kl_reverse,
        kl_forward=kl_forward,
        kl_reverse_interval=(kl_reverse, kl_reverse),
        kl_forward_interval=(kl_forward, kl_forward),
        kl_reverse_stderr=0.0,
        kl_forward_stderr=0.0,
        tv=tv,
        per_position_kl=per_position,
        per_position_kl_stderr=zeros,
        logit_error=logit_error,
        bound=bound,
        logit_error_scope="reachable states",
        method="exact",
        level=level,
        horizon=space.horizon,
        notes=tuple(notes),
    )


def _exact_on_lattices(arm: ARM, teacher: ARM, level) -> DistillationReport:
    """The exact report of two table ARMs by dynamic programming, for spaces too large to
    enumerate: ``KL(p_q ‖ p_R) = Σ_{t,s} μ_q[t,s] KL(π_q(·|s) ‖ π_R(·|s))`` with ``μ_q`` the
    student's state occupancy on the lattice both live on (their product unless they are the
    same automaton), per decision t the per-position KL; the forward KL with ``μ_R``; ε over
    the states either visits. TV has no such decomposition: None."""
    reverse, forward, eps = (np.asarray(x, np.float64) for x in _lattice_terms(arm, teacher))
    note = "both KLs by dynamic programming on the lattices (no TV: the space is too large to "
    note += "enumerate)"
    return DistillationReport.from_positions(
        reverse, forward, float(eps), level=level, notes=(note,)
    )


@jax.jit
def _lattice_terms(student: ARM, teacher: ARM):
    """``occupancy_terms`` of two table ARMs on their common lattice."""
    lat, other = student.lattice, teacher.lattice
    log_s, log_t = student.log_policy_table(), teacher.log_policy_table()
    same = lat is other or (
        lat.initial == other.initial and np.array_equal(lat.delta, other.delta)
        and lat.reads_prompt == other.reads_prompt and student.prompt is None
    )  # fmt: skip
    if not same:
        lat = lat.product(other)
        log_s, log_t = lat.lift(log_s, 0), lat.lift(log_t, 1)
    mu_s, mu_t = (occupancy(lat, log, student.prompt, trusted=True) for log in (log_s, log_t))
    return occupancy_terms(log_s, log_t, mu_s, mu_t)


def occupancy_terms(log_q, log_p, mu_q, mu_p):
    """``(KL(q ‖ p) [T], KL(p ‖ q) [T], ε)`` of two policies ``log_q``, ``log_p`` ``[T, S, A]``
    on one lattice with occupancies ``mu_q``, ``mu_p`` ``[T, S, A]``: per position
    ``Σ_s μ_q[t, s] KL(π_q(·|s) ‖ π_p(·|s))`` (0 · ∞ = 0 off the visited states) and its forward
    twin, and the largest half-range of the gaps ``log π_p − log π_q`` over the states either
    visits."""
    m_q, m_p = mu_q.sum(-1), mu_p.sum(-1)  # [T, S]

    def weighted(m, kl):
        return jnp.where(m > 0, m * kl, 0).sum(-1)

    reverse = weighted(m_q, categorical_kl(log_q, log_p))
    forward = weighted(m_p, categorical_kl(log_p, log_q))
    eps = jnp.where((m_q > 0) | (m_p > 0), half_range_gap(log_p, log_q), 0).max()
    return reverse, forward, eps


@jax.jit
def _log_probs(ebm, arm, seqs):
    """``(log p_R, log p_q)`` ``[N]`` over enumerated sequences, in chunks."""
    return map_in_chunks(lambda y: (ebm.log_prob(y), arm.log_prob(y)), seqs, ENUMERATION_CHUNK)


@jax.jit
def _path_terms_chunked(student, teacher, tokens):
    return map_in_chunks(lambda y: path_terms(student, teacher, y), tokens, ENUMERATION_CHUNK)


def path_terms(student: ARM, teacher: ARM, tokens):
    """Per decision along ``tokens [N, T]``: the next-token ``KL(π_student ‖ π_teacher)`` and the
    half-range ``ε_t`` of the finite gaps ``log π_teacher − log π_student`` (∞ where exactly one
    is −∞), both ``[N, T]`` and 0 after the response ends."""
    log_s = student.log_policies(tokens)
    log_t = teacher.log_policies(tokens)
    active = student.space.active(tokens)
    kl = categorical_kl(log_s, log_t)
    return jnp.where(active, kl, 0), jnp.where(active, half_range_gap(log_t, log_s), 0)


def half_range_gap(log_a, log_b) -> jax.Array:
    """``(max Δ − min Δ) / 2`` over the last axis for ``Δ = log_a − log_b`` (the tightest
    per-state shift, docs/theory.md#the-kl-bound): entries −∞ in both are left out; ∞ if exactly
    one is −∞."""
    dead_a, dead_b = log_a == -jnp.inf, log_b == -jnp.inf
    skip = dead_a | dead_b
    gap = jnp.where(skip, 0, log_a - jnp.where(skip, 0, log_b))
    high = jnp.max(jnp.where(skip, -jnp.inf, gap), -1)
    low = jnp.min(jnp.where(skip, jnp.inf, gap), -1)
    half = jnp.where(high == -jnp.inf, 0, (high - low) / 2)  # NaN stays NaN
    return jnp.where(jnp.any(dead_a ^ dead_b, -1), jnp.inf, half)


# -- Monte Carlo mode -------------------------------------------------------------------------


def _monte_carlo(ebm, arm, teacher, reason, num_samples, key, level, target_samples):
    student_key, target_key, log_z_key = jax.random.split(key, 3)
    notes = [] if teacher is not None else [reason]
    ys, rewards, log_q = (np.asarray(x) for x in _student_draws(ebm, arm, student_key, num_samples))
    refuse_invalid(rewards, "the ebm's reward", rows=ys)
    refuse_invalid(log_q, "arm.log_prob(y)", rows=ys)
    log_w = rewards.astype(np.float64) - log_q
    log_z, log_z_se, note = _log_z(ebm, arm, num_samples, log_z_key)
    notes += [note] if note else []
    visited_eps = []
    per_position = per_position_se = None
    if teacher is not None:
        kl_t, eps_t = (np.asarray(x, np.float64) for x in _path_terms_chunked(arm, teacher, ys))
        refuse_invalid(kl_t + eps_t, "the arm's next-token KL", rows=ys, allow_pos_inf=True)
        per_position = kl_t.mean(0)
        with np.errstate(invalid="ignore"):
            per_position_se = kl_t.std(0, ddof=1) / np.sqrt(num_samples)
        per_position_se = np.where(np.isinf(per_position), 0.0, per_position_se)
        kl_reverse, kl_reverse_se = mean_and_stderr(kl_t.sum(-1))
        visited_eps.append(eps_t.max())
        notes.append(
            f"KL(student ‖ target): chain-rule sum of exact next-token KLs along {num_samples} "
            "student draws"
        )
    else:
        elbo, elbo_se = mean_and_stderr(log_w)
        kl_reverse = log_z - elbo
        kl_reverse_se = float(np.hypot(elbo_se, log_z_se))
        notes.append("KL(student ‖ target) = log Z − ELBO (student draws)")
    draws = target_draws(ebm, target_samples, num_samples, target_key)
    eubo = None
    if draws is not None:
        target_rewards, target_log_q = (
            np.asarray(x, np.float64) for x in rewards_and_log_q(ebm, DefensiveMixture(arm), draws)
        )
        if np.any(target_rewards == -np.inf):
            raise ValueError("target_samples hold a sequence with R = -inf: not target draws")
        if np.any(target_log_q == -np.inf):
            eubo, eubo_se = np.inf, 0.0
        else:
            eubo, eubo_se = mean_and_stderr(target_rewards - target_log_q)
        kl_forward = eubo - log_z
        kl_forward_se = float(np.hypot(eubo_se, log_z_se))
        if teacher is not None:
            visited_eps.append(np.asarray(_path_terms_chunked(arm, teacher, draws)[1]).max())
        notes.append(f"KL(target ‖ student) = EUBO − log Z ({draws.shape[0]} target draws)")
    else:
        kl_forward, snis_se = _self_normalised_forward_kl(log_w, log_z)
        kl_forward_se = float(np.hypot(snis_se, log_z_se))
        notes.append(
            "KL(target ‖ student) by self-normalised importance sampling with the student as "
            "proposal (no exact target draws): biased, trust it only when k-hat < 0.7"
        )
    logit_error = float(max(visited_eps)) if visited_eps else None
    for name, value in (("KL(student ‖ target)", kl_reverse), ("KL(target ‖ student)", kl_forward)):
        if value < 0:
            notes.append(
                f"{name} estimate is negative ({value:.3g}): Monte Carlo error; the "
                "interval is clipped at 0"
            )
    return DistillationReport(
        kl_reverse=float(kl_reverse),
        kl_forward=float(kl_forward),
        kl_reverse_interval=_kl_interval(kl_reverse, kl_reverse_se, level),
        kl_forward_interval=_kl_interval(kl_forward, kl_forward_se, level),
        kl_reverse_stderr=_finite_stderr(kl_reverse, kl_reverse_se),
        kl_forward_stderr=_finite_stderr(kl_forward, kl_forward_se),
        tv=None,
        per_position_kl=per_position,
        per_position_kl_stderr=per_position_se,
        logit_error=logit_error,
        bound=None if logit_error is None else 2 * ebm.space.horizon * logit_error,
        logit_error_scope="visited states (lower estimate)",
        method="mc",
        level=level,
        horizon=ebm.space.horizon,
        num_samples=num_samples,
        notes=tuple(notes),
        extras={
            "log_z": log_z,
            "log_z_stderr": log_z_se,
            "elbo": float(np.mean(log_w)),
            "eubo": eubo,
            "khat": sequence_khat(log_w, ys)[0],
            "ess": kish_ess(log_w),
        },
    )


@functools.partial(jax.jit, static_argnames="count")
def _student_draws(ebm, arm, key, count: int):
    """``(tokens [count, T], R, log q)`` for ``count`` draws of the student."""
    tokens, (steps,) = arm.sample_with_intermediates(key, (count,))
    return tokens, ebm.unnormalized_log_prob(tokens), steps.sum(-1)


def _log_z(ebm, arm, num_samples, key):
    """``(log Z, stderr, note)``: exact when the EBM has it, else importance sampling with the
    student as proposal (independent draws)."""
    if ebm.log_partition_source == "estimate":
        attached = ebm.log_partition_estimate
        stderr = float(getattr(attached, "stderr", 0.0))
        return float(ebm.log_partition()), stderr, "log Z: the estimate attached to the EBM"
    if ebm.exact_route.is_exact:
        return float(ebm.log_partition()), 0.0, None
    est = log_partition(
        ebm, "is", proposal=arm, num_samples=num_samples, key=key, target_samples=None
    )
    note = f"log Z by importance sampling with the student ({num_samples} draws)"
    return est.log_z, est.stderr, note


def _self_normalised_forward_kl(log_w, log_z):
    """``Σ_i w̄_i (log w_i − log Z)`` and its delta-method stderr ``√(Σ w̄_i² (f_i − KL)²)``."""
    log_w = jnp.asarray(log_w)
    weights = np.asarray(softmax(log_w, 0), np.float64)
    f = np.where(weights > 0, np.asarray(log_w) - log_z, 0.0)
    kl = float(np.sum(weights * f))
    return kl, float(np.sqrt(np.sum(weights**2 * (f - kl) ** 2)))


def _kl_interval(value, stderr, level) -> tuple[float, float]:
    """Normal interval with both ends clipped at 0 (a KL is not negative); ``(∞, ∞)`` for an
    infinite KL."""
    if value == np.inf:
        return (np.inf, np.inf)
    low, high = normal_interval(value, stderr, level)
    return (max(low, 0.0), max(high, 0.0))


def _finite_stderr(value, stderr) -> float:
    """The standard error, 0 for an infinite KL (its interval is the point ``(∞, ∞)``)."""
    return 0.0 if value == np.inf else float(stderr)


def _teacher(ebm):
    """The target's exact ARM ``M(r)`` and None, or None and the reason it has none."""
    reason = no_exact_arm_reason(ebm)
    if reason is None:
        return to_arm(ebm), None
    return None, f"no per-position KL or logit error: the target has no exact ARM ({reason})"
