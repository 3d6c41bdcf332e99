"""Total variation between two table ARMs on one lattice: exact where their supports can be
enumerated, otherwise bracketed by enumerating prefixes.

TV is no sum over positions, so no DP gives it. For the prefixes ``x`` of depth k (responses
that ended before k count as their own outcome) with masses ``Q_x``, ``P_x``:

    TV_k = ½ Σ_x |Q_x − P_x|  ≤  TV  ≤  TV_k + Σ_{x live} min(Q_x, P_x) · c(x)

the lower bound the TV of the depth-k marginal, the upper one by coupling the two up to x and
bounding the continuations' TV by ``c(x) = min(1, √(K/2), √(1 − e^{−K}))`` over either KL ``K``
of the continuations from x (Pinsker, Bretagnolle–Huber): ``kl_to_go``, a backward DP. The
prefixes are expanded breadth first while they fit ``max_cells``; once every response has ended
the two bounds meet. When ``P`` is a conditional on a small accepted set ``A`` (its support),
``TV = ½ (Σ_{y ∈ A} |P(y) − Q(y)| + 1 − Q(A))`` exactly (``accepted_tv``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import seqppl as sp

__all__ = ["tv_bounds", "kl_to_go", "accepted_sequences", "accepted_tv", "path_log_probs"]


def kl_to_go(log_a, log_b, delta, eos_id: int) -> np.ndarray:
    """float64 ``[T+1, S]``: ``K_t(s)``, the KL of ``a``'s continuations from state s before
    decision t against ``b``'s: ``K_T = 0``, ``K_t(s) = Σ_c π_a(c|s) (log π_a(c|s) − log
    π_b(c|s) + [c ≠ EOS] K_{t+1}(δ(s, c)))``; ∞ where ``a`` reaches a token ``b`` forbids.

    ``log_a``, ``log_b``: normalised log-policies ``[T, S, A]``; ``delta``: int ``[S, A]``.
    """
    dtype = jnp.result_type(log_a, log_b)
    log_a, log_b = jnp.asarray(log_a, dtype), jnp.asarray(log_b, dtype)
    return np.asarray(_kl_to_go(log_a, log_b, jnp.asarray(delta), eos_id), np.float64)


@functools.partial(jax.jit, static_argnames="eos_id")
def _kl_to_go(log_a, log_b, delta, eos_id):
    is_eos = (jnp.arange(delta.shape[1]) == eos_id)[None, :]

    def step(ahead, rows):
        a, b = rows
        later = jnp.where(is_eos, 0.0, ahead[delta])  # [S, A]
        gap = jnp.where((a == -jnp.inf) | (b == -jnp.inf), 0.0, a - b) + later
        terms = jnp.where(a == -jnp.inf, 0.0, jnp.exp(a) * gap)
        infinite = (a > -jnp.inf) & ((b == -jnp.inf) | (later == jnp.inf))
        K = jnp.where(infinite, jnp.inf, terms).sum(1)
        return K, K

    last = jnp.zeros(delta.shape[0], log_a.dtype)
    _, K = jax.lax.scan(step, last, (log_a, log_b), reverse=True)
    return jnp.concatenate([K, last[None]])


def _continuation_cap(kl_ab: np.ndarray, kl_ba: np.ndarray) -> np.ndarray:
    """``c = min(1, √(K/2), √(1 − e^{−K}))`` over both directions (0 ≤ c ≤ 1)."""
    caps = [np.ones_like(kl_ab)]
    for kl in (np.maximum(kl_ab, 0.0), np.maximum(kl_ba, 0.0)):
        caps += [np.sqrt(kl / 2), np.sqrt(-np.expm1(-kl))]
    return np.nan_to_num(np.minimum.reduce(caps), nan=1.0, posinf=1.0)


def tv_bounds(
    log_q: np.ndarray,
    log_p: np.ndarray,
    delta: np.ndarray,
    initial: int,
    eos_id: int,
    max_cells: int = 1 << 22,
) -> tuple[float, float]:
    """``(low, high)`` with ``low ≤ TV(q, p) ≤ high`` (module docstring; equal when every
    prefix fit), for log-policies ``log_q``, ``log_p`` float ``[T, S, A]`` on a lattice with
    transitions ``delta`` int ``[S, A]``, initial state ``initial`` and EOS id ``eos_id``.
    Depth k+1 is expanded while its prefixes times ``A`` fit ``max_cells``."""
    T, _, A = log_q.shape
    cap = _continuation_cap(
        kl_to_go(log_q, log_p, delta, eos_id), kl_to_go(log_p, log_q, delta, eos_id)
    )
    states = np.array([initial])
    mass_q, mass_p = np.zeros(1), np.zeros(1)  # log masses of the live prefixes
    ended = 0.0  # Σ |Q − P| over responses that ended
    low, high = 0.0, float(cap[0, initial])
    for t in range(T):
        if states.size * A > max_cells:
            break
        child_q = mass_q[:, None] + log_q[t, states].astype(np.float64)  # [N, A]
        child_p = mass_p[:, None] + log_p[t, states].astype(np.float64)
        ended += float(np.abs(np.exp(child_q[:, eos_id]) - np.exp(child_p[:, eos_id])).sum())
        child_q[:, eos_id] = child_p[:, eos_id] = -np.inf
        rows, tokens = np.nonzero((child_q > -np.inf) | (child_p > -np.inf))
        states = delta[states[rows], tokens]
        mass_q, mass_p = child_q[rows, tokens], child_p[rows, tokens]
        q, p = np.exp(mass_q), np.exp(mass_p)
        level = 0.5 * (ended + float(np.abs(q - p).sum()))
        low = max(low, level)
        high = min(high, level + float((np.minimum(q, p) * cap[t + 1, states]).sum()))
        if states.size == 0:
            break
    return low, max(low, high)


def accepted_sequences(dfa: sp.Lattice, limit: int) -> np.ndarray | None:
    """int32 ``[N, T]``: every sequence of ``dfa``'s space (EOS-padded) that ``dfa`` accepts, in
    depth-first order; None when there are more than ``limit`` (counted first, by a DP)."""
    space = dfa.space
    V, L = space.vocab_size, space.length
    accept = np.asarray(dfa.accepting)
    tokens = np.asarray(dfa.delta)[:, :V]
    count = np.zeros((L + 1, dfa.num_states), np.int64)  # count[k, d]: k tokens already used
    count[L] = accept
    for k in range(L - 1, -1, -1):
        count[k] = np.minimum(accept + count[k + 1][tokens].sum(1), limit + 1)
    if count[0, dfa.initial] > limit:
        return None
    rows, stack = [], [(dfa.initial, ())]
    while stack:
        state, prefix = stack.pop()
        if accept[state]:
            rows.append(prefix)
        if len(prefix) < L:
            after = tokens[state, ::-1]
            live = np.flatnonzero(count[len(prefix) + 1, after] > 0)
            stack += [(int(after[i]), (*prefix, V - 1 - int(i))) for i in live]
    out = np.full((len(rows), space.horizon), space.eos_id, np.int32)
    for n, row in enumerate(rows):
        out[n, : len(row)] = row
    return out


def path_log_probs(log_pi: np.ndarray, delta: np.ndarray, initial: int, tokens, eos_id: int):
    """float64 ``[N]``: ``Σ_t log π[t, s_t, y_t]`` along each row of ``tokens`` int ``[N, T]``
    up to its first EOS (``s_0 = initial``, ``s_{t+1} = δ(s_t, y_t)``)."""
    tokens = np.asarray(tokens)
    states = np.full(tokens.shape[0], initial)
    total, done = np.zeros(tokens.shape[0]), np.zeros(tokens.shape[0], bool)
    for t in range(tokens.shape[1]):
        step = log_pi[t, states, tokens[:, t]].astype(np.float64)
        total += np.where(done, 0.0, step)
        done |= tokens[:, t] == eos_id
        states = delta[states, tokens[:, t]]
    return total


def accepted_tv(log_q, log_p, delta, initial: int, accepted, eos_id: int) -> float:
    """The exact TV when ``p`` lives on ``accepted`` int ``[N, T]`` (every sequence it can
    emit): ``½ (Σ_{y ∈ A} |p(y) − q(y)| + 1 − q(A))``."""
    q = np.exp(path_log_probs(log_q, delta, initial, accepted, eos_id))
    p = np.exp(path_log_probs(log_p, delta, initial, accepted, eos_id))
    return 0.5 * float(np.abs(p - q).sum() + max(0.0, 1.0 - q.sum()))
