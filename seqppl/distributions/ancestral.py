"""Ancestral sampling in one ``lax.scan``: ``y_t ~ softmax(q_t)``, EOS forever after the first EOS.

The model supplies ``next_logits(state, t) -> [*shape, A]`` and ``advance(state, token, t)``;
the sampler applies the space's last-decision mask and returns the tokens and the per-step
log-probabilities (0 after EOS), so that ``log p(y)`` needs no second pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from seqppl.logspace import log_softmax
from seqppl.space import SequenceSpace

__all__ = [
    "ancestral_sample",
    "draw_step",
    "decision_log_policy",
    "step_log_prob",
    "cumulative_probs",
    "inverse_cdf",
    "MATMUL_CDF_MAX",
]

MATMUL_CDF_MAX = 256
"""Largest action count whose cumulative sums are taken by a triangular matmul."""


def ancestral_sample(key, shape, space: SequenceSpace, state, next_logits, advance):
    """Samples ``[*shape, T]`` tokens and their step log-probs ``[*shape, T]``.

    Args:
        key: a PRNG key.
        shape: the batch of sequences drawn in parallel.
        space: the ``SequenceSpace``.
        state: the initial model state (any pytree).
        next_logits: ``(state, t) -> float [*shape, A]``, the logits of decision ``t``.
        advance: ``(state, token [*shape], t) -> state``.
    """
    T, eos = space.horizon, space.eos_sentinel

    def body(carry, inputs):
        state, done = carry
        t, step_key = inputs
        token, step_log_p = draw_step(step_key, next_logits(state, t), t, done, space)
        return (advance(state, token, t), done | (token == eos)), (token, step_log_p)

    keys = jax.random.split(key, T)
    done = jnp.zeros(shape, bool)
    _, (tokens, log_ps) = jax.lax.scan(body, (state, done), (jnp.arange(T), keys))
    return jnp.moveaxis(tokens, 0, -1), jnp.moveaxis(log_ps, 0, -1)


def draw_step(key, logits, t, done, space: SequenceSpace):
    """One decision of every sequence: ``(token [*shape], log π(token) [*shape])``.

    ``logits [*shape, A]`` are masked for decision ``t`` (only EOS may end a variable-length
    space) and normalised; sequences already ``done`` (after EOS) get EOS with log-prob 0.
    ``logits`` may instead be a pair ``(cumulative π [*shape, A], log_prob_of)``: the
    normalised, masked, monotone CDF rows (table ARMs precompute them once) and
    ``log_prob_of(token) -> log π(token)``; the token is then the number of actions whose
    cumulative mass is below ``u · total`` (never a zero-mass action, since those repeat the
    previous cumulative value).
    """
    if isinstance(logits, tuple):
        cumulative = logits[0]
        u = 1.0 - jax.random.uniform(key, cumulative.shape[:-1], dtype=cumulative.dtype)
        drawn = jnp.sum(cumulative < (u * cumulative[..., -1])[..., None], -1, dtype=jnp.int32)
    else:
        log_p = decision_log_policy(logits, t, space)
        drawn = inverse_cdf(key, log_p, cumulative_probs(log_p))
    token = jnp.where(done, space.eos_sentinel, drawn)
    return token, step_log_prob(logits, token, t, done, space)


def decision_log_policy(logits, t, space: SequenceSpace):
    """``log π(· | decision t)`` ``[*shape, A]``: ``logits`` masked for decision ``t`` (only EOS
    at a variable-length space's last) and normalised."""
    allowed = jnp.where(
        t == space.horizon - 1,
        jnp.asarray(space.action_mask()[-1]),
        jnp.ones((space.num_actions,), bool),
    )
    return log_softmax(jnp.where(jnp.broadcast_to(allowed, logits.shape), logits, -jnp.inf))


def step_log_prob(logits, token, t, done, space: SequenceSpace):
    """``log π(token)`` ``[*shape]`` of a given token at decision ``t``, as ``draw_step`` scores
    the tokens it draws (``logits`` raw, or its ``(cumulative, log_prob_of)`` pair); 0 where
    ``done``."""
    if isinstance(logits, tuple):
        step_log_p = logits[1](token)
    else:
        log_p = decision_log_policy(logits, t, space)
        step_log_p = jnp.take_along_axis(log_p, token[..., None], axis=-1)[..., 0]
    return jnp.where(done, jnp.zeros_like(step_log_p), step_log_p)


def cumulative_probs(log_p):
    """``Σ_{b ≤ a} exp(log_p[..., b] − max)`` ``[..., A]`` (unnormalised cumulative mass).

    For ``A ≤ MATMUL_CDF_MAX`` one matmul with a triangular matrix (4× faster than ``cumsum``
    on CPU; full float32 precision, never TF32); its rounding can break monotonicity by an ulp,
    which ``inverse_cdf`` tolerates."""
    probs = jnp.exp(log_p - jnp.max(log_p, axis=-1, keepdims=True))
    num_actions = log_p.shape[-1]
    if num_actions > MATMUL_CDF_MAX:
        return jnp.cumsum(probs, axis=-1)
    upper = jnp.triu(jnp.ones((num_actions, num_actions), probs.dtype))
    return jnp.matmul(probs, upper, precision=jax.lax.Precision.HIGHEST)


def inverse_cdf(key, log_p, cumulative):
    """One draw per row from one uniform per row: the first action with positive mass whose
    cumulative mass reaches ``u · top``, ``u ~ U(0, 1]``, ``top`` the largest cumulative mass
    of a positive action. ``A``-times fewer random numbers than the Gumbel-max trick of
    ``jax.random.categorical``, which dominates sampling on CPU. Zero-mass actions are never
    drawn, even where rounding makes ``cumulative`` non-monotone by an ulp."""
    positive = log_p > -jnp.inf
    top = jnp.max(jnp.where(positive, cumulative, 0), axis=-1, keepdims=True)
    u = 1.0 - jax.random.uniform(key, log_p.shape[:-1], dtype=cumulative.dtype)
    reached = positive & (cumulative >= u[..., None] * top)
    return jnp.argmax(reached, axis=-1).astype(jnp.int32)
