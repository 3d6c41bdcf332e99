"""NaN-safe log-space reductions: −∞ rows give value −∞ and gradient 0.

``jax.nn.logsumexp`` returns −∞ on a row that is entirely −∞ but its gradient there is NaN
(``exp(x - max)`` with ``max = −∞``). Every reduction in seqppl goes through this module, whose
rules are: ``logsumexp(x) = m + log Σ exp(x - m)`` with ``m = max x``; its derivative is the
softmax ``exp(x - logsumexp(x))``, defined as 0 on an all −∞ row. ``+∞`` and NaN inputs are
refused upstream by validation, never handled here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "logsumexp",
    "log_softmax",
    "softmax",
    "categorical_kl",
    "NEG_INF",
    "first_nan_or_pos_inf",
]

NEG_INF = -jnp.inf


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def logsumexp(x: jax.Array, axis: int = -1) -> jax.Array:
    """``log Σ_a exp(x[..., a])`` over ``axis``; −∞ (gradient 0) where every entry is −∞.

    Args:
        x: float ``[..., A]``; −∞ entries are excluded actions.
        axis: the reduced axis (an int).

    Returns:
        float ``[...]``, the dtype of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> print(logsumexp(jnp.array([[0.0, 0.0], [-jnp.inf, -jnp.inf]])).round(4))
        [0.6931   -inf]
    """
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)))
    total = jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)
    empty = total == 0  # every entry −∞; NaN and +∞ propagate
    out = jnp.where(empty, NEG_INF, jnp.log(jnp.where(empty, 1, total)) + m)
    return jnp.squeeze(out, axis=axis)


@logsumexp.defjvp
def _logsumexp_jvp(axis, primals, tangents):
    (x,), (dx,) = primals, tangents
    out = logsumexp(x, axis)
    weights = _softmax_from(x, jnp.expand_dims(out, axis))
    return out, jnp.sum(weights * jnp.where(weights == 0, 0, dx), axis=axis)


def _softmax_from(x: jax.Array, lse: jax.Array) -> jax.Array:
    """``exp(x - lse)`` with 0 wherever ``lse = −∞`` (an all −∞ row); NaN propagates."""
    empty = lse == NEG_INF
    return jnp.exp(jnp.where(empty, NEG_INF, x - jnp.where(empty, 0, lse)))


def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x - logsumexp(x)`` over ``axis``; an all −∞ row stays −∞ (gradient 0); NaN in, NaN out.

    Example:
        >>> import jax.numpy as jnp
        >>> print(log_softmax(jnp.array([0.0, -jnp.inf])))
        [  0. -inf]
    """
    lse = jnp.expand_dims(logsumexp(x, axis), axis)
    empty = lse == NEG_INF  # NaN propagates: a NaN logit must not pass for an excluded action
    return jnp.where(empty, NEG_INF, x - jnp.where(empty, 0, lse))


def softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``exp(log_softmax(x))``; an all −∞ row gives zeros (not NaN)."""
    return _softmax_from(x, jnp.expand_dims(logsumexp(x, axis), axis))


def categorical_kl(log_p: jax.Array, log_q: jax.Array, axis: int = -1) -> jax.Array:
    """``KL(p ‖ q) = Σ_a p_a (log p_a − log q_a)`` over ``axis`` from normalised log-probabilities.

    Conventions, read from the log-probabilities (not from ``exp``, which may underflow): a term
    with ``log p_a = −∞`` is 0 whatever ``q_a``; a finite ``log p_a`` with ``log q_a = −∞`` makes
    the KL ``+∞``. Gradients are finite wherever the KL is.

    Example:
        >>> import jax.numpy as jnp
        >>> print(categorical_kl(jnp.log(jnp.array([0.5, 0.5])), jnp.log(jnp.array([1.0, 0.0]))))
        inf
    """
    absent = log_p == NEG_INF
    missing = ~absent & (log_q == NEG_INF)  # +∞ even when p_a underflows to 0
    gap = jnp.where(absent | missing, 0, log_p - jnp.where(absent | missing, 0, log_q))
    terms = jnp.where(missing, jnp.inf, jnp.where(absent, 0, jnp.exp(log_p) * gap))
    return jnp.sum(terms, axis=axis)


def first_nan_or_pos_inf(x) -> tuple[int, ...] | None:
    """Index of the first NaN or +∞ in a concrete array, else None (also None under tracing).

    Scores in seqppl are finite or −∞ (a hard constraint); validation uses this to refuse the
    rest eagerly with the offending index.
    """
    if isinstance(x, jax.core.Tracer):
        return None
    x = np.asarray(x)
    bad = np.isnan(x) | (x == np.inf)
    return tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else None
