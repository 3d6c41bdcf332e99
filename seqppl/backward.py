"""The backward pass of the soft Bellman map: the dynamic program behind M, log Z and gradients.

``V[T] = 0`` (−∞ in a variable-length space: only EOS is left), ``q[t, s, a] = r[t, s, a] +
[a ≠ EOS] · V[t+1, δ(s, a)]``, ``V[t, s] = logsumexp_a q[t, s, a]``, over a lattice, by one of
two schedules: a ``lax.scan`` over time (sequential; a Markov lattice's continuation is a
reshape, any other a gather through δ) or an associative scan over log-semiring transfer
matrices (parallel in time). ``seqppl.bellman`` builds the public transforms on it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from seqppl.checks import check_choice
from seqppl.lattice import Lattice
from seqppl.logspace import NEG_INF, logsumexp

HIGHEST = jax.lax.Precision.HIGHEST
EXP_SPACE_CELLS = 1024
"""Smallest ``S·A`` for which a homogeneous table's pass runs in exp space (below it the check
of that pass costs more than the exponentials it saves)."""

__all__ = ["backward", "next_state_index", "SCHEDULES", "EXP_SPACE_CELLS"]

SCHEDULES = ("sequential", "parallel")
"""Schedules of the backward pass (``method=``): a ``lax.scan`` over time, or an associative
scan over transfer matrices."""


def next_state_index(lat: Lattice) -> np.ndarray:
    """``δ`` with EOS sent to the sentinel state ``S`` (value 0: the response ended)."""
    return np.where(lat.space.continuing_actions()[None, :], lat.delta, lat.num_states)


def backward(lat: Lattice, r: jax.Array, keep: str, method: str = "sequential"):
    """The backward pass: ``keep`` is ``"q"`` (``(q [T, S, A], V [T, S])``), ``"values"``
    (``V``) or ``"root"`` (``V[0]`` only, nothing stacked over time)."""
    method = check_choice("method", method, SCHEDULES)
    next_index = next_state_index(lat)
    space = lat.space
    if method == "parallel":
        out = _backward_parallel(
            jnp.asarray(next_index), r, horizon=space.horizon, eos=space.eos, write_q=keep == "q"
        )
        return out[0] if keep == "root" else out
    if lat.kind == "markov" and lat.order >= 2:  # δ((c0, rest), a) = (rest, a): a reshape
        rows = (space.vocab_size + 1) ** (lat.order - 1)
        return _backward_scan(
            None, r, horizon=space.horizon, eos=space.eos, keep=keep, markov_rows=rows
        )
    if lat.next_state_ignores_state:
        next_index = next_index[:1]
        if np.array_equal(next_index[0, : space.vocab_size], np.arange(space.vocab_size)):
            next_index = None  # δ(s, a) = a (Markov(1)): the continuation is a slice of V
    return _backward_scan(
        None if next_index is None else jnp.asarray(next_index),
        r,
        horizon=space.horizon,
        eos=space.eos,
        keep=keep,
    )


@functools.partial(jax.jit, static_argnames=("horizon", "eos", "keep", "markov_rows"))
def _backward_scan(next_index, r, *, horizon, eos, keep, markov_rows=None):
    """Backward scan. The continuation ``V[t+1, δ(s, a)]`` is a gather through ``next_index
    [S or 1, A]`` (EOS sends to a sentinel state valued 0, appended only in EOS spaces); a slice
    ``V[t+1, :V]`` when ``next_index`` is None (δ(s, a) = a, Markov(1)); or, for a Markov
    lattice of order ≥ 2 (``markov_rows = (V+1)^(k−1)``), a reshape: state ``s = c0·rows +
    rest`` moves to ``rest·(V+1) + a``, whatever ``c0``.

    A homogeneous ``[S, A]`` table (``S·A ≥ EXP_SPACE_CELLS``) whose continuation is structured
    (a slice, a reshape, or one row for every state) is exponentiated once, ``E = exp(r −
    max_a r)``, and each step is then a product with ``exp(V[t+1] − max V[t+1])`` (no
    exponential per entry): ``V[t, s] = log u_s + max_a r[s] + max V[t+1]`` with ``u = Σ_a E ·
    exp(...)``. Where ``u_s ≥ τ = A · tiny · 2^(mantissa + 2)`` every term that
    underflowed lies below the last bit of the result, so it is exact to rounding. If any row of
    any step falls below ``τ`` (all −∞ rows among them), the whole pass is redone in log space,
    ``V[t, s] = logsumexp_a r + V[t+1, δ]``, which is also the pass of ``[T, S, A]`` tables and
    of a gather through a full δ (an automaton, a product).
    """
    num_states, num_actions = r.shape[-2:]
    end = jnp.full((num_states,), NEG_INF if eos else 0, r.dtype)
    vocab = num_actions - 1 if eos else num_actions
    if markov_rows is not None:  # [..., S, A] viewed as [..., c0, rest, A], once
        r = r.reshape(*r.shape[:-2], num_states // markov_rows, markov_rows, num_actions)
    homogeneous = r.ndim == (2 if markov_rows is None else 3)
    # exp space pays where the continuation is structured (a slice, a reshape, one row for every
    # state: products instead of exponentials); a gather through a full δ stays in log space
    structured = markov_rows is not None or next_index is None or next_index.shape[0] == 1
    exp_space = homogeneous and structured and num_states * num_actions >= EXP_SPACE_CELLS

    def continuation(v_next, ended=0.0):
        """``v_next[δ(s, a)]``, broadcastable against a step's rewards; EOS gets ``ended`` (the
        value of a finished response: 0, or ``exp(0 − top)`` for exponentiated values)."""
        if markov_rows is None and next_index is None:  # δ(s, a) = a
            following = v_next[:vocab]
            if eos:
                following = jnp.concatenate([following, jnp.full((1,), ended, r.dtype)])
            return following[None]
        if markov_rows is None:
            if eos:  # EOS leads to the sentinel state
                v_next = jnp.concatenate([v_next, jnp.full((1,), ended, r.dtype)])
            return v_next[next_index]
        following = v_next.reshape(markov_rows, vocab + 1)[:, :vocab]  # V[(rest, a)], a < V
        if eos:
            following = jnp.concatenate([following, jnp.full((markov_rows, 1), ended, r.dtype)], -1)
        return following[None]  # [1, rest, A]: the same whatever c0

    def output(v_t, r_t, following):
        if keep == "q":
            return (r_t + following).reshape(num_states, num_actions), v_t
        return v_t if keep == "values" else None

    def log_space_step(v_next, r_t):
        following = continuation(v_next)
        v_t = logsumexp(r_t + following, -1).reshape(num_states)
        return v_t, output(v_t, r_t, following)

    def run(step, start):
        if homogeneous:
            return jax.lax.scan(lambda c, _: step(c, r), start, None, length=horizon, reverse=True)
        return jax.lax.scan(step, start, r, reverse=True)

    def log_space():
        root, out = run(log_space_step, end)
        return root if keep == "root" else out

    if not exp_space:
        return log_space()
    row_max = jnp.max(r, -1)
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0))
    scaled = jnp.exp(r - row_max[..., None])  # E, in [0, 1]
    floor = num_actions * jnp.finfo(r.dtype).tiny * 2.0 ** (jnp.finfo(r.dtype).nmant + 2)

    def exp_space_step(carry, r_t):
        v_next, exact = carry
        top = jnp.max(v_next)
        if eos:
            top = jnp.maximum(top, 0)  # the sentinel's value 0 is among the continuations
        top = jax.lax.stop_gradient(jnp.where(jnp.isfinite(top), top, 0))
        weights = continuation(jnp.exp(v_next - top), jnp.exp(-top))  # S exponentials, then δ
        if markov_rows is not None:  # [1, rest, A]: one product per context
            u = jnp.einsum("cra,ra->cr", scaled, weights[0], precision=HIGHEST)
        else:  # δ(s, a) depends on a only: a matrix-vector product
            u = jnp.matmul(scaled, weights[0], precision=HIGHEST)
        kept = u >= floor
        v_t = (jnp.log(jnp.where(kept, u, 1)) + row_max + top).reshape(num_states)
        following = continuation(v_next) if keep == "q" else None
        return (v_t, exact & jnp.all(kept)), output(v_t, r_t, following)

    (root, exact), out = run(exp_space_step, (end, jnp.asarray(True)))
    fast = root if keep == "root" else out
    return jax.lax.cond(exact, lambda: fast, log_space)


@functools.partial(jax.jit, static_argnames=("horizon", "eos", "write_q"))
def _backward_parallel(next_index, r, *, horizon, eos, write_q):
    """The same values by an associative scan over log-semiring transfer matrices (parallel in
    time: depth O(log T), work O(T·S³)).

    ``K_t[s, s'] = logsumexp_{a: next(s, a) = s'} r[t, s, a]`` on ``S + 1`` states (the last, a
    sentinel reached by EOS, keeps value 0: ``K_t[S, S] = 0``), so ``V[t] = K_t ⊗ V[t+1]`` and
    ``V[t] = (K_t ⊗ K_{t+1} ⊗ … ⊗ K_{T−1}) ⊗ V[T]``, the suffix products from
    ``lax.associative_scan`` (``⊗``: max-plus-style ``logsumexp`` matrix product).
    """
    num_states, num_actions = r.shape[-2:]
    r = jnp.broadcast_to(r, (horizon, num_states, num_actions))
    lands = next_index[:, :, None] == jnp.arange(num_states + 1)[None, None, :]  # [S, A, S+1]
    kernels = logsumexp(jnp.where(lands[None], r[..., None], NEG_INF), -2)  # [T, S, S + 1]
    sentinel = jnp.where(jnp.arange(num_states + 1) == num_states, 0.0, NEG_INF).astype(r.dtype)
    kernels = jnp.concatenate(
        [kernels, jnp.broadcast_to(sentinel, (horizon, 1, num_states + 1))], axis=-2
    )
    # reverse scan: combine(later suffix, earlier kernel) = earlier ⊗ later
    suffix = jax.lax.associative_scan(
        lambda later, earlier: _log_matmul(earlier, later), kernels, reverse=True
    )
    end = jnp.full((num_states + 1,), NEG_INF if eos else 0, r.dtype).at[-1].set(0)
    values = logsumexp(suffix + end[None, None, :], -1)  # [T, S + 1]
    if not write_q:
        return values[:, :num_states]
    following = jnp.concatenate([values[1:], end[None]], axis=0)  # V[t + 1], sentinel last
    q = r + following[:, next_index]
    return q, values[:, :num_states]


def _log_matmul(a, b):
    """``(a ⊗ b)[..., i, j] = logsumexp_k a[..., i, k] + b[..., k, j]``."""
    return logsumexp(a[..., :, :, None] + b[..., None, :, :], -2)
