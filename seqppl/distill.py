"""Distilling an EBM into an ARM (THEORY §4): KL-regularised fine-tuning: ``argmin_q KL(p_q‖p_R)``.

Four objectives, each a loss ``(params, step, carry) -> (value, diagnostics)`` for the loop
shared with ``fit`` (progress bar, atomic checkpoints, resume, Ctrl-C):

- ``"reverse_kl"``: ``KL(p_q ‖ p_R) = E_q[log q − R] + A``. Exact gradients by enumeration on
  small spaces; otherwise the score-function estimator ``E_q[(log q − R − b) ∇ log q]`` with a
  leave-one-out baseline ``b``.
- ``"forward_kl"``: ``KL(p_R ‖ p_q) = E_{p_R}[log p_R − log q]``, gradient ``−Σ_i w̄_i ∇ log q(y_i)``
  with self-normalised weights ``w_i ∝ exp(R(y_i) − log π(y_i))`` of draws from a proposal π
  (the student itself, detached; a frozen copy swapped when the student improves; or a given
  ARM): distributional policy gradients.
- ``"soft_bellman"``: squared soft-Bellman residuals along draws of the student,
  ``q(s_t, y_t) ← r(s_t, y_t) + logsumexp q(s_{t+1}, ·)`` (the target detached; 0 after the end):
  the fixed point is ``q = M(r)``. Needs the target's local rewards (a lattice EBM).
- ``"exact"``: the exact ``KL(p_R ‖ p_q)`` over every sequence (cross-entropy to the target's
  exact probabilities minus its entropy); enumerable spaces only.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from seqppl.diagnostics import EstimateWarning, kish_ess, pareto_khat
from seqppl.distillation_report import distillation_error
from seqppl.distributions import ARM, EBM
from seqppl.estimate import check_key, check_proposal
from seqppl.logspace import categorical_kl, logsumexp, softmax
from seqppl.sharding import check_mesh, shard_batch
from seqppl.space import MAX_ENUMERATE
from seqppl.train import (
    _fingerprint,
    _in_chunks,
    check_counts,
    exact_risk,
    optimise,
    trapezoid_schedule,
)

__all__ = ["distill", "OBJECTIVES", "EXACT_GRADIENT_MAX", "DistillationStopped"]

OBJECTIVES = ("reverse_kl", "forward_kl", "soft_bellman", "exact")
EXACT_GRADIENT_MAX = 1 << 16
"""``reverse_kl`` with ``estimator="auto"`` enumerates spaces up to this many sequences."""
EVALUATE_EXACT_MAX = 1 << 16
"""``evaluate="auto"`` reports exactly up to this many sequences, by Monte Carlo beyond."""


class DistillationStopped(UserWarning):
    """Distillation stopped early: a non-finite loss, or untrustworthy importance weights."""


def distill(
    ebm,
    student,
    objective: str = "reverse_kl",
    *,
    steps: int = 1000,
    key,
    optimizer=None,
    learning_rate: float = 1e-2,
    num_samples: int = 256,
    estimator: str = "auto",
    proposal="student",
    evaluate="auto",
    eval_samples: int = 1024,
    log_every: int = 50,
    checkpoint_dir=None,
    checkpoint_every: int = 500,
    max_khat: float = 0.7,
    min_ess_fraction: float = 0.01,
    patience: int = 3,
    progress: bool = True,
    mesh=None,
):
    """Train ``student.params`` to approximate ``ebm``; returns ``(trained student, history)``.

    Args:
        ebm: the target ``EBM`` (batch shape ``()``).
        student: a trainable ``ARM`` (table, callable with ``params=``, or NNX) over the same
            space and prompt.
        objective: one of ``OBJECTIVES`` (module docstring).
        steps: optimiser steps.
        key: PRNG key; step k's draws use ``fold_in(key, k)``.
        optimizer: an optax transformation; default Adam on
            ``trapezoid_schedule(learning_rate, steps)`` (warm-up, constant, linear decay).
        learning_rate: the default optimiser's peak rate (1e-2).
        num_samples: draws per step for the sampled objectives.
        estimator: ``reverse_kl`` only: ``"auto"`` (exact gradients up to
            ``EXACT_GRADIENT_MAX`` sequences), ``"exact"`` or ``"score_function"``.
        proposal: ``forward_kl`` only: ``"student"`` (its current parameters, detached),
            ``"frozen"`` (a copy of the student, replaced by the student at a logged step when
            that step's weighted draws show the student closer to the target: the off-policy
            DPG scheme; history column ``proposal_swapped``), or a fixed ``ARM``.
        evaluate: ``"auto"``, ``"exact"``, ``"mc"`` or None: a ``distillation_error`` report at
            every logged step (before its update), adding ``kl_reverse``, ``kl_reverse_low``,
            ``kl_reverse_high``, ``kl_forward`` (with ``_low``/``_high``), ``logit_error`` and
            ``bound`` (where available) to the history. Monte Carlo reports use
            ``eval_samples`` draws and one fixed key (common random numbers across steps) and
            add their weights' ``eval_ess`` and ``eval_khat``.
        log_every, checkpoint_dir, checkpoint_every, progress: as in ``fit``.
        max_khat, min_ess_fraction, patience: ``forward_kl`` stops when its weights' Pareto
            k-hat exceeds ``max_khat`` or their Kish ESS falls below ``min_ess_fraction`` of
            the draws at ``patience`` consecutive logged steps (the gradient estimates are no
            longer trustworthy).
        mesh: a ``jax.sharding.Mesh`` for data parallelism (``seqppl.sharding``): each step's
            draws (or each chunk of the enumerated space for the exact objectives) are split
            over its devices and the parameters replicated; the evaluation reports run
            unsharded. Same results as one device up to the order of sums.

    Returns:
        ``(student.with_params(trained), history)``: ``history`` is a dict of numpy arrays
        (``step``, ``loss``, ``seconds``, plus ``ess`` and ``khat`` for ``forward_kl`` and the
        evaluation columns); when training stopped early, ``history["stop_reason"]`` holds the
        message, a ``DistillationStopped`` warning is raised, and the parameters are the last
        good ones (also in the checkpoint).

    The reported ``loss`` is ``KL(p_q ‖ p_R)`` for ``reverse_kl`` (an estimate when sampled; the
    negative ELBO if ``log Z`` is intractable), ``KL(p_R ‖ p_q)`` for ``forward_kl`` (the
    self-normalised estimate) and ``exact``, and for ``soft_bellman`` the squared residuals
    summed over a sequence's decisions, averaged over the step's draws.
    """
    if not isinstance(ebm, EBM):
        raise TypeError(f"ebm must be an EBM, got {type(ebm).__name__}")
    if ebm.batch_shape != ():
        raise ValueError(f"ebm has batch shape {ebm.batch_shape}; distil one prompt at a time")
    check_proposal(ebm, student, "student")
    if student.params is None:
        raise ValueError("student has no params to train (from_table, params= or from_nnx)")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    check_counts(
        ("steps", steps, 1),
        ("num_samples", num_samples, 2),
        ("log_every", log_every, 1),
        ("checkpoint_every", checkpoint_every, 1),
        ("eval_samples", eval_samples, 2),
        ("patience", patience, 1),
    )
    if not (isinstance(max_khat, (int, float)) and max_khat > 0):
        raise ValueError(f"max_khat must be a number > 0, got {max_khat!r}")
    if not (isinstance(min_ess_fraction, (int, float)) and 0 <= min_ess_fraction < 1):
        raise ValueError(f"min_ess_fraction must be in [0, 1), got {min_ess_fraction!r}")
    if estimator != "auto" and objective != "reverse_kl":
        raise ValueError(f"estimator= applies to objective='reverse_kl' only, not {objective!r}")
    if not (isinstance(proposal, str) and proposal == "student") and objective != "forward_kl":
        raise ValueError(f"proposal= applies to objective='forward_kl' only, not {objective!r}")
    check_key(key)
    check_mesh(mesh)
    loss_fn, summarise, refresh = _objective(
        ebm, student, objective, key, num_samples, estimator, proposal, mesh
    )
    metrics = _evaluation(ebm, student, evaluate, eval_samples, key)
    optimizer = optimizer or optax.adam(trapezoid_schedule(learning_rate, steps))

    def should_stop(history):
        khat = history.get("khat", [])[-patience:]
        ess = history.get("ess", [])[-patience:]
        least = min_ess_fraction * num_samples
        untrusted = [k > max_khat or e < least for k, e in zip(khat, ess, strict=True)]
        if len(untrusted) == patience and all(untrusted):
            return (
                f"the importance weights' k-hat exceeded {max_khat} or their ESS fell below "
                f"{least:g} at {patience} logged steps in a row (last: k-hat {khat[-1]:.2f}, "
                f"ESS {ess[-1]:.1f}): the gradient estimates are not trustworthy"
            )
        return None

    params, history, stopped = optimise(
        loss_fn,
        student.params,
        steps=steps,
        optimizer=optimizer,
        fingerprint=_fingerprint(
            student,
            steps,
            None,
            None,
            "distill",
            objective,
            estimator,
            proposal if isinstance(proposal, str) else "an ARM",
            str(np.asarray(jax.random.key_data(key)).tolist()),
            str(num_samples),
        ),
        checkpoint_dir=checkpoint_dir,
        checkpoint_every=checkpoint_every,
        log_every=log_every,
        metrics=metrics,
        summarise=summarise,
        should_stop=should_stop,
        carry=student.params if proposal == "frozen" and objective == "forward_kl" else None,
        refresh=refresh,
        progress=progress,
        desc=f"distill ({objective})",
        mesh=mesh,
    )
    if stopped is not None:
        history["stop_reason"] = stopped
        warnings.warn(f"distillation stopped: {stopped}", DistillationStopped, stacklevel=2)
    return student.with_params(params), history


def _objective(ebm, student, objective, key, num_samples, estimator, proposal, mesh=None):
    """``(loss_fn(params, step, carry) -> (value, aux), summarise | None, refresh | None)``;
    the batch axis of the draws (or of each enumerated chunk) split over ``mesh``."""
    space = ebm.space
    if objective == "soft_bellman":
        if not ebm.is_lattice:
            raise ValueError(
                "objective='soft_bellman' needs the target's local rewards (an EBM whose parts "
                "are all lattice tables); for this target use 'reverse_kl' or 'forward_kl'"
                + (" or 'exact'" if space.num_sequences <= MAX_ENUMERATE else "")
            )
        return _soft_bellman(ebm, student, key, num_samples, mesh), None, None
    if objective == "exact" or (objective == "reverse_kl" and _exact_gradients(space, estimator)):
        if space.num_sequences > MAX_ENUMERATE:
            asked = "objective='exact'" if objective == "exact" else "estimator='exact'"
            raise ValueError(
                f"{asked} enumerates the space ({space.num_sequences} sequences, more than "
                f"{MAX_ENUMERATE}); use a sampled objective ('reverse_kl' with "
                "estimator='score_function', 'forward_kl' or 'soft_bellman')"
            )
        seqs = jnp.asarray(space.enumerate())
        log_p = jax.jit(lambda e: _in_chunks(e.log_prob, seqs, mesh))(ebm)
        if objective == "exact":
            entropy = -jnp.sum(jnp.where(log_p > -jnp.inf, jnp.exp(log_p) * log_p, 0))
            return (
                lambda params, step, carry: (
                    exact_risk(student.with_params(params), log_p, mesh) - entropy,
                    {},
                ),
                None,
                None,
            )

        def reverse(params, step, carry):
            model = student.with_params(params)
            return categorical_kl(_in_chunks(model.log_prob, seqs, mesh), log_p, 0), {}

        return reverse, None, None
    if objective == "reverse_kl":
        return _score_function(ebm, student, key, num_samples, mesh), None, None
    return _forward_kl(ebm, student, key, num_samples, proposal, mesh)


def _exact_gradients(space, estimator) -> bool:
    if estimator not in ("auto", "exact", "score_function"):
        raise ValueError(
            f"estimator must be 'auto', 'exact' or 'score_function', got {estimator!r}"
        )
    if estimator == "auto":
        return space.num_sequences <= EXACT_GRADIENT_MAX
    return estimator == "exact"


def _exact_log_z(ebm):
    """The EBM's exact log Z, or None when it has none."""
    try:
        return ebm.log_partition()
    except ValueError:
        return None


def _detached_draws(student, params, key, step, num_samples, mesh):
    """``num_samples`` draws of the student at ``params`` (no gradient), step ``step``'s key,
    split over ``mesh``."""
    detached = student.with_params(jax.lax.stop_gradient(params))
    return shard_batch(detached.sample(jax.random.fold_in(key, step), (num_samples,)), mesh)


def _score_function(ebm, student, key, num_samples, mesh):
    """``mean((f_i − b_i) ∇ log q(y_i))``, ``f = log q − R``, ``b_i`` the mean of the others."""
    log_z = _exact_log_z(ebm)

    def loss(params, step, carry):
        model = student.with_params(params)
        tokens = _detached_draws(student, params, key, step, num_samples, mesh)
        log_q = model.log_prob(tokens)
        f = jax.lax.stop_gradient(log_q) - ebm.unnormalized_log_prob(tokens)
        baseline = (jnp.sum(f) - f) / (num_samples - 1)
        surrogate = jnp.mean((f - baseline) * log_q)
        value = jnp.mean(f) + (0.0 if log_z is None else log_z)
        return surrogate - jax.lax.stop_gradient(surrogate) + value, {}

    return loss


def _forward_kl(ebm, student, key, num_samples, proposal, mesh):
    """Self-normalised importance sampling of ``−E_{p_R}[∇ log q]`` (DPG).

    ``proposal="frozen"``: the proposal is a copy of the student (``carry``) replaced by the
    current student at a logged step when the step's draws say the student is closer to the
    target: lower self-normalised cross-entropy ``−Σ w̄_i log q(y_i)`` than the copy's.
    """
    if not (proposal in ("student", "frozen") or isinstance(proposal, ARM)):
        raise ValueError(f"proposal must be 'student', 'frozen' or an ARM, got {proposal!r}")
    if isinstance(proposal, ARM):
        check_proposal(ebm, proposal, "proposal")
    log_z = _exact_log_z(ebm)

    def loss(params, step, carry):
        model = student.with_params(params)
        if proposal == "student":
            behaviour = student.with_params(jax.lax.stop_gradient(params))
        elif proposal == "frozen":
            behaviour = student.with_params(carry)
        else:
            behaviour = proposal
        tokens, (steps,) = shard_batch(
            behaviour.sample_with_intermediates(jax.random.fold_in(key, step), (num_samples,)),
            mesh,
        )
        rewards = ebm.unnormalized_log_prob(tokens)
        log_w = rewards - steps.sum(-1)
        weights = softmax(log_w, 0)
        log_q = model.log_prob(tokens)
        kept = weights > 0
        detached_log_q = jax.lax.stop_gradient(jnp.where(kept, log_q, 0))  # the value only
        cross = jnp.sum(jnp.where(kept, weights * (rewards - detached_log_q), 0))
        estimate = logsumexp(log_w, 0) - jnp.log(num_samples) if log_z is None else log_z
        surrogate = -jnp.sum(jax.lax.stop_gradient(weights) * jnp.where(kept, log_q, 0))
        value = jnp.where(jnp.any(kept), cross - estimate, jnp.nan)
        aux = {
            "log_w": log_w,
            "cross_entropy": {
                "student": -jnp.sum(jnp.where(kept, weights * jnp.where(kept, log_q, 0), 0)),
                "proposal": -jnp.sum(jnp.where(kept, weights * steps.sum(-1), 0)),
            },
        }
        return surrogate - jax.lax.stop_gradient(surrogate) + value, aux

    def summarise(aux):
        log_w = np.asarray(aux["log_w"], np.float64)
        return {"ess": kish_ess(log_w), "khat": pareto_khat(log_w)}

    def swap_when_better(carry, params, aux):
        better = float(aux["cross_entropy"]["student"]) < float(aux["cross_entropy"]["proposal"])
        return (params if better else carry), {"proposal_swapped": float(better)}

    return loss, summarise, swap_when_better if proposal == "frozen" else None


def _soft_bellman(ebm, student, key, num_samples, mesh):
    """Mean over student draws of ``Σ_t (q(s_t, y_t) − r_t − [t+1 active] V_q(s_{t+1}))²``."""
    space, joint, table = ebm.space, ebm.joint, ebm.reward_table()

    def loss(params, step, carry):
        model = student.with_params(params)
        tokens = _detached_draws(student, params, key, step, num_samples, mesh)
        logits = space.mask_logits(model.logits(tokens))  # [N, T, A]
        taken = jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0]
        active = space.active(tokens)
        following = jnp.concatenate([active[..., 1:], jnp.zeros_like(active[..., :1])], -1)
        next_value = jnp.concatenate(
            [logsumexp(logits[..., 1:, :], -1), jnp.zeros_like(taken[..., :1])], -1
        )
        target = joint.path_scores(table, tokens, ebm.prompt) + jnp.where(
            following, jax.lax.stop_gradient(next_value), 0
        )
        residual = jnp.where(active, taken - target, 0)
        return jnp.mean(jnp.sum(residual**2, -1)), {}

    return loss


def _evaluation(ebm, student, evaluate, eval_samples, key):
    """``metrics(params) -> dict`` from a distillation report, or None."""
    if evaluate is None:
        return None
    if evaluate == "auto":
        evaluate = "exact" if ebm.space.num_sequences <= EVALUATE_EXACT_MAX else "mc"
    if evaluate not in ("exact", "mc"):
        raise ValueError(f"evaluate must be 'auto', 'exact', 'mc' or None, got {evaluate!r}")
    eval_key = jax.random.fold_in(key, np.iinfo(np.int32).max)

    def metrics(params):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EstimateWarning)
            report = distillation_error(
                ebm,
                student.with_params(params),
                evaluate,
                num_samples=eval_samples,
                key=eval_key,
            )
        row = {
            "kl_reverse": report.kl_reverse,
            "kl_reverse_low": report.kl_reverse_interval[0],
            "kl_reverse_high": report.kl_reverse_interval[1],
            "kl_forward": report.kl_forward,
            "kl_forward_low": report.kl_forward_interval[0],
            "kl_forward_high": report.kl_forward_interval[1],
        }
        if report.bound is not None:
            row.update(logit_error=report.logit_error, bound=report.bound)
        if report.method == "mc":  # the evaluation draws' own diagnostics
            row.update(eval_ess=report.extras["ess"], eval_khat=report.extras["khat"])
        return row

    return metrics
