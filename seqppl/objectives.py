"""The four distillation objectives, each a loss for ``seqppl.loop.optimise``.

``objective_loss(ebm, student, objective, ...)`` returns ``loss_fn(params, step, carry) ->
(value, aux)`` (the gradient of ``value`` in ``params`` drives training; score-function terms
are added as ``surrogate − stop_gradient(surrogate)``), and optional host-side ``summarise`` and
``refresh`` hooks. A new objective is a new function here and a name in ``OBJECTIVES``.

- ``"reverse_kl"``: ``KL(p_q ‖ p_R) = E_q[log q − R] + A``. Exact gradients by enumeration on
  small spaces; otherwise the score-function estimator ``E_q[(log q − R − b) ∇ log q]`` with a
  leave-one-out baseline ``b``.
- ``"forward_kl"``: ``KL(p_R ‖ p_q) = E_{p_R}[log p_R − log q]``, gradient ``−Σ_i w̄_i ∇ log q(y_i)``
  with self-normalised weights ``w_i ∝ exp(R(y_i) − log π(y_i))`` of draws from a proposal π
  (the student itself, detached; a frozen copy swapped when the student improves; or a given
  ARM): distributional policy gradients.
- ``"soft_bellman"``: squared soft-Bellman residuals along draws of the student,
  ``q(s_t, y_t) ← r(s_t, y_t) + logsumexp q(s_{t+1}, ·)`` (the target detached; 0 after the end):
  the fixed point is ``q = M(r)``. Needs the target's local rewards (the DP route).
- ``"exact"``: the exact ``KL(p_R ‖ p_q)`` over every sequence (cross-entropy to the target's
  exact probabilities minus its entropy); enumerable spaces only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.checks import check_choice, check_model
from seqppl.diagnostics import kish_ess, sequence_khat
from seqppl.distributions import ARM, ExactRoute
from seqppl.distributions.support import map_in_chunks
from seqppl.logspace import categorical_kl, logsumexp, softmax
from seqppl.sharding import shard_batch, to_host
from seqppl.space import ENUMERATION_CHUNK, MAX_ENUMERATE, SMALL_SPACE
from seqppl.train import exact_risk

__all__ = ["objective_loss", "OBJECTIVES", "ESTIMATORS"]

OBJECTIVES = ("reverse_kl", "forward_kl", "soft_bellman", "exact")
ESTIMATORS = ("auto", "exact", "score_function")
"""``reverse_kl``'s gradient estimators: ``"auto"`` is exact up to ``SMALL_SPACE`` sequences."""


def objective_loss(ebm, student, objective, key, num_samples, estimator, proposal, mesh=None):
    """``(loss_fn(params, step, carry) -> (value, aux), summarise | None, refresh | None)`` for
    ``optimise``: the batch axis of the draws (or of each enumerated chunk) split over ``mesh``.

    Args:
        ebm: the target EBM; student: the ARM trained; objective: one of ``OBJECTIVES``.
        key: typed PRNG key, step k's draws from ``fold_in(key, k)``.
        num_samples: draws per step; estimator, proposal: as in ``distill``.
    """
    space = ebm.space
    if objective == "soft_bellman":
        if ebm.exact_route is not ExactRoute.DYNAMIC_PROGRAM:
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
        log_p = jax.jit(lambda e: map_in_chunks(e.log_prob, seqs, ENUMERATION_CHUNK, mesh))(ebm)
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
            log_q = map_in_chunks(model.log_prob, seqs, ENUMERATION_CHUNK, mesh)
            return categorical_kl(log_q, log_p, 0), {}

        return reverse, None, None
    if objective == "reverse_kl":
        return _score_function(ebm, student, key, num_samples, mesh), None, None
    return _forward_kl(ebm, student, key, num_samples, proposal, mesh)


def _exact_gradients(space, estimator) -> bool:
    estimator = check_choice("estimator", estimator, ESTIMATORS)
    if estimator == "auto":
        return space.num_sequences <= SMALL_SPACE
    return estimator == "exact"


def _exact_log_z(ebm):
    """The EBM's exact log Z, or None when its route has none."""
    return ebm.log_partition() if ebm.exact_route.is_exact else None


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
    if isinstance(proposal, ARM):
        check_model(proposal, ARM, ebm, "proposal")
    elif not (isinstance(proposal, str) and proposal in ("student", "frozen")):
        raise ValueError(f"proposal must be 'student', 'frozen' or an ARM, got {proposal!r}")
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
            "tokens": tokens,
            "cross_entropy": {
                "student": -jnp.sum(jnp.where(kept, weights * jnp.where(kept, log_q, 0), 0)),
                "proposal": -jnp.sum(jnp.where(kept, weights * steps.sum(-1), 0)),
            },
        }
        return surrogate - jax.lax.stop_gradient(surrogate) + value, aux

    def summarise(aux):  # on every process: the draws gathered from the mesh
        log_w = to_host(aux["log_w"]).astype(np.float64)
        return {"ess": kish_ess(log_w), "khat": sequence_khat(log_w, to_host(aux["tokens"]))[0]}

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
