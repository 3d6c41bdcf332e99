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

__all__ = ["ancestral_sample", "draw_step"]


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
    T, eos = space.horizon, (space.eos_id if space.eos else -1)

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
    """
    T, A = space.horizon, space.num_actions
    eos = space.eos_id if space.eos else -1
    allowed = jnp.where(t == T - 1, jnp.asarray(space.action_mask()[-1]), jnp.ones((A,), bool))
    log_p = log_softmax(jnp.where(jnp.broadcast_to(allowed, logits.shape), logits, -jnp.inf))
    token = jnp.where(done, eos, _inverse_cdf(key, log_p))
    step_log_p = jnp.take_along_axis(log_p, token[..., None], axis=-1)[..., 0]
    return token, jnp.where(done, jnp.zeros_like(step_log_p), step_log_p)


def _inverse_cdf(key, log_p):
    """One draw per row of ``softmax(log_p)`` ``[..., A]`` from one uniform per row: the first
    index whose cumulative mass reaches ``u · total``, ``u ~ U(0, 1]``. Zero-mass actions are
    never drawn (their cumulative sum equals the previous one). ``A``-times fewer random numbers
    than the Gumbel-max trick of ``jax.random.categorical``, which dominates sampling on CPU."""
    probs = jnp.exp(log_p - jnp.max(log_p, axis=-1, keepdims=True))
    cumulative = jnp.cumsum(probs, axis=-1)
    u = 1.0 - jax.random.uniform(key, log_p.shape[:-1], dtype=cumulative.dtype)
    threshold = (u * cumulative[..., -1])[..., None]
    return jnp.sum(cumulative < threshold, axis=-1, dtype=jnp.int32)
