"""Distilling an EBM into an ARM (docs/theory.md#distillation): KL-regularised fine-tuning,
``argmin_q KL(p_q ‖ p_R)``, with one of the objectives of ``seqppl.objectives`` driven by the
loop shared with ``fit`` (``seqppl.loop``: progress bar, atomic checkpoints, resume, Ctrl-C),
evaluated at every logged step by a distillation report, and stopped when the importance
weights of ``forward_kl`` say its gradients can no longer be trusted.
"""

from __future__ import annotations

import warnings

import jax
import numpy as np
import optax

from seqppl.checks import (
    check_choice,
    check_counts,
    check_key,
    check_mesh,
    check_model,
    check_number,
)
from seqppl.diagnostics import EstimateWarning
from seqppl.distillation_report import REPORT_METHODS, distillation_error
from seqppl.distributions import ARM, EBM
from seqppl.loop import digest, optimise, run_fingerprint, trapezoid_schedule
from seqppl.objectives import ESTIMATORS, OBJECTIVES, objective_loss
from seqppl.space import SMALL_SPACE
from seqppl.train import model_signature

__all__ = ["distill", "DistillationStopped"]


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
    check_model(student, ARM, ebm, "student")
    if student.params is None:
        raise ValueError("student has no params to train (from_table, params= or from_nnx)")
    objective = check_choice("objective", objective, OBJECTIVES)
    check_choice("estimator", estimator, ESTIMATORS)
    check_counts(
        ("steps", steps, 1),
        ("num_samples", num_samples, 2),
        ("log_every", log_every, 1),
        ("checkpoint_every", checkpoint_every, 1),
        ("eval_samples", eval_samples, 2),
        ("patience", patience, 1),
    )
    check_number("max_khat", max_khat, 0, float("inf"))
    check_number("min_ess_fraction", min_ess_fraction, 0, 1, "[)")
    check_number("learning_rate", learning_rate, 0, float("inf"))
    if estimator != "auto" and objective != "reverse_kl":
        raise ValueError(f"estimator= applies to objective='reverse_kl' only, not {objective!r}")
    if not (isinstance(proposal, str) and proposal == "student") and objective != "forward_kl":
        raise ValueError(f"proposal= applies to objective='forward_kl' only, not {objective!r}")
    key = check_key(key)
    check_mesh(mesh)
    loss_fn, summarise, refresh = objective_loss(
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
        fingerprint=None
        if checkpoint_dir is None
        else run_fingerprint(
            model_signature(student),
            student.params,
            optimizer,
            steps=str(steps),
            key=key,
            target=f"{model_signature(ebm)} {digest(ebm)}",
            objective=objective,
            estimator=estimator,
            proposal=proposal if isinstance(proposal, str) else f"ARM {digest(proposal)}",
            num_samples=str(num_samples),
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


def _evaluation(ebm, student, evaluate, eval_samples, key):
    """``metrics(params) -> dict`` from a distillation report, or None."""
    if evaluate is None:
        return None
    evaluate = check_choice("evaluate", evaluate, ("auto", *REPORT_METHODS), {"is": "mc"})
    if evaluate == "auto":
        evaluate = "exact" if ebm.space.num_sequences <= SMALL_SPACE else "mc"
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
