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

__all__ = [
    "logsumexp",
    "log_softmax",
    "softmax",
    "categorical_kl",
    "NEG_INF",
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
    return jnp.squeeze(_shifted_sum(x, axis)[2], axis=axis)


def _shifted_sum(x: jax.Array, axis: int):
    """``(e, total, lse)``: ``e = exp(x − m)`` with ``m`` the (finite) row maximum, ``total =
    Σ e``, ``lse = log total + m`` (keepdims; −∞ on an all −∞ row, where ``total = 0``)."""
    m = jnp.max(x, axis=axis, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m)))
    e = jnp.exp(x - m)
    total = jnp.sum(e, axis=axis, keepdims=True)
    return e, total, jnp.log(total) + m


@logsumexp.defjvp
def _logsumexp_jvp(axis, primals, tangents):
    """The tangent is ``Σ softmax(x) · dx`` with softmax 0 on an all −∞ row (so the gradient
    there is 0, not NaN); the softmax reuses the primal's exponentials (one pass, like autodiff
    of the plain formula). As for any JAX function, an infinite incoming tangent ``dx`` (e.g.
    through ``log 0``) times a zero weight is NaN."""
    (x,), (dx,) = primals, tangents
    e, total, lse = _shifted_sum(x, axis)
    weights = e / jnp.where(total == 0, 1, total)
    tangent = jnp.sum(weights * dx, axis=axis)
    return jnp.squeeze(lse, axis=axis), tangent


def _softmax_from(x: jax.Array, lse: jax.Array) -> jax.Array:
    """``exp(x - lse)`` with 0 on an all −∞ row (``lse = −∞``: its entries are −∞ and ``0`` is
    subtracted, a ``where`` on the reduced row only); NaN propagates."""
    return jnp.exp(x - jnp.where(lse == NEG_INF, 0, lse))


def log_softmax(x: jax.Array, axis: int = -1) -> jax.Array:
    """``x - logsumexp(x)`` over ``axis``; an all −∞ row stays −∞ (finite gradient); NaN in, NaN
    out.

    Example:
        >>> import jax.numpy as jnp
        >>> print(log_softmax(jnp.array([0.0, -jnp.inf])))
        [  0. -inf]
    """
    lse = logsumexp(x, axis)
    # an all −∞ row has lse = −∞: subtract 0 there (−∞ − 0 = −∞); NaN propagates through lse
    return x - jnp.expand_dims(jnp.where(lse == NEG_INF, 0, lse), axis)


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
