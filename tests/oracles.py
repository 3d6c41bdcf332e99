"""Brute-force oracles: NumPy float64 over every sequence (itertools.product), no seqppl numerics.

Lattice tables are read through the lattice's ``delta`` and ``initial`` only (their construction is
checked against the independent state definitions below in test_lattice.py).
"""

from __future__ import annotations

import itertools

import numpy as np


def all_sequences(vocab_size: int, length: int, eos: bool) -> np.ndarray:
    """Every sequence, int [N, T]: exactly L tokens, or k <= L tokens then EOS padding."""
    if not eos:
        return np.array(list(itertools.product(range(vocab_size), repeat=length)), int).reshape(
            -1, length
        )
    rows = []
    for k in range(length + 1):
        for body in itertools.product(range(vocab_size), repeat=k):
            rows.append(list(body) + [vocab_size] * (length + 1 - k))
    return np.array(rows, int)


def response_length(y, eos_id) -> int:
    """Number of decisions τ that count: up to and including the first EOS."""
    if eos_id is None:
        return len(y)
    return int(np.argmax(np.asarray(y) == eos_id)) + 1


def walk(delta, start: int, tokens) -> list[int]:
    """States before each token, reading tokens from ``start``."""
    states, s = [], int(start)
    for a in tokens:
        states.append(s)
        s = int(delta[s, a])
    return states


def prompt_start(lat, prompt) -> int:
    """Initial state: the prefix tree ignores prompts; products combine; others read them."""
    if prompt is None:
        return int(lat.initial)
    if lat.kind == "product":
        a, b = lat.factors
        return prompt_start(a, prompt) * b.num_states + prompt_start(b, prompt)
    if lat.kind == "prefix_tree":
        return int(lat.initial)
    s = int(lat.initial)
    for a in prompt:
        s = int(lat.delta[s, a])
    return s


def as_time_table(table, horizon: int) -> np.ndarray:
    table = np.asarray(table, np.float64)
    return np.broadcast_to(table, (horizon, *table.shape[-2:])) if table.ndim == 2 else table


def sequence_reward(r, lat, y, prompt=None) -> float:
    """R(y) = Σ_{t ≤ τ} r[t, s_t, y_t]."""
    space = lat.space
    r = as_time_table(r, space.horizon)
    tau = response_length(y, space.eos_id)
    states = walk(lat.delta, prompt_start(lat, prompt), y[:tau])
    return float(sum(r[t, s, y[t]] for t, s in enumerate(states)))


def log_z(r, lat, prompt=None) -> float:
    seqs = all_sequences(lat.space.vocab_size, lat.space.length, lat.space.eos)
    return logsumexp_np(np.array([sequence_reward(r, lat, y, prompt) for y in seqs]))


def logsumexp_np(x, axis=None):
    x = np.asarray(x, np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis) if axis is not None else float(out.squeeze())


def arm_log_prob(q, lat, y, prompt=None) -> float:
    """log p_q(y) = Σ_{t ≤ τ} log softmax(q[t, s_t, allowed])[y_t]; only EOS at a variable
    space's last decision."""
    space = lat.space
    q = as_time_table(q, space.horizon).copy()
    if space.eos:
        q[-1, :, : space.vocab_size] = -np.inf
    tau = response_length(y, space.eos_id)
    states = walk(lat.delta, prompt_start(lat, prompt), y[:tau])
    total = 0.0
    for t, s in enumerate(states):
        row = q[t, s]
        if row[y[t]] == -np.inf:
            return -np.inf
        total += row[y[t]] - logsumexp_np(row)
    return float(total)


def occupancy(r, lat, prompt=None) -> np.ndarray:
    """Σ_y p_R(y) 1[s_t = s, y_t = a], float [T, S, A]."""
    space = lat.space
    seqs = all_sequences(space.vocab_size, space.length, space.eos)
    rewards = np.array([sequence_reward(r, lat, y, prompt) for y in seqs])
    total = logsumexp_np(rewards)
    out = np.zeros((space.horizon, lat.num_states, space.num_actions))
    if not np.isfinite(total):
        return out
    probs = np.exp(rewards - total)
    for y, p in zip(seqs, probs, strict=True):
        tau = response_length(y, space.eos_id)
        for t, s in enumerate(walk(lat.delta, prompt_start(lat, prompt), y[:tau])):
            out[t, s, y[t]] += p
    return out


def markov_state(context, vocab_size: int, order: int) -> int:
    """Independent definition: the last `order` tokens, left-padded with V, base V+1 digits."""
    ctx = [vocab_size] * order + list(context)
    digits = ctx[len(ctx) - order :] if order else []
    return int(sum(d * (vocab_size + 1) ** (order - 1 - i) for i, d in enumerate(digits)))


def prefix_state(prefix, vocab_size: int) -> int:
    """Independent definition: breadth-first index of a prefix."""
    depth = len(prefix)
    offset = sum(vocab_size**d for d in range(depth))
    return int(offset + sum(a * vocab_size ** (depth - 1 - i) for i, a in enumerate(prefix)))


def kl_np(log_p, log_q) -> float:
    """Σ p (log p − log q) with 0 where log p = −∞ and ∞ where only log q = −∞ (log-space test)."""
    total = 0.0
    for a, b in zip(np.ravel(log_p), np.ravel(log_q), strict=True):
        if a == -np.inf:
            continue
        if b == -np.inf:
            return np.inf
        total += np.exp(a) * (a - b)
    return float(total)


def active_prefixes(space):
    """Every prefix h before a decision (no EOS in it), with its decision index t = len(h)."""
    limit = space.length if space.eos else space.length - 1
    for t in range(limit + 1):
        yield from itertools.product(range(space.vocab_size), repeat=t)


def target_policy(r, lat, prefix, prompt=None) -> np.ndarray:
    """log π_R(a | prefix) ∝ log Σ over completions of exp(the rewards from decision t on)."""
    space = lat.space
    r = as_time_table(r, space.horizon)
    t = len(prefix)
    scores = np.full(space.num_actions, -np.inf)
    for y in all_sequences(space.vocab_size, space.length, space.eos):
        tau = response_length(y, space.eos_id)
        if tau <= t or tuple(y[:t]) != tuple(prefix):
            continue
        states = walk(lat.delta, prompt_start(lat, prompt), y[:tau])
        tail = sum(r[k, states[k], y[k]] for k in range(t, tau))
        scores[y[t]] = np.logaddexp(scores[y[t]], tail)
    return scores - logsumexp_np(scores) if np.isfinite(logsumexp_np(scores)) else scores


def table_policy(q, lat, prefix, prompt=None) -> np.ndarray:
    """log softmax of the ARM table's row at the prefix's state (only EOS at the last decision)."""
    space = lat.space
    q = as_time_table(q, space.horizon).copy()
    if space.eos:
        q[-1, :, : space.vocab_size] = -np.inf
    t = len(prefix)
    state = walk(lat.delta, prompt_start(lat, prompt), list(prefix) + [0])[-1]
    row = q[t, state]
    return row - logsumexp_np(row)


def half_range_np(log_a, log_b) -> float:
    dead_a, dead_b = np.isneginf(log_a), np.isneginf(log_b)
    if np.any(dead_a ^ dead_b):
        return np.inf
    keep = ~dead_a
    if not keep.any():
        return 0.0
    gap = log_a[keep] - log_b[keep]
    return float(gap.max() - gap.min()) / 2


def distillation_errors(r, lat_r, q, lat_q, prompt=None) -> dict:
    """Both KLs, TV, per-position reverse KL and ε of a table ARM against a table EBM."""
    space = lat_r.space
    seqs = all_sequences(space.vocab_size, space.length, space.eos)
    rewards = np.array([sequence_reward(r, lat_r, y, prompt) for y in seqs])
    log_p = rewards - logsumexp_np(rewards)
    log_q = np.array([arm_log_prob(q, lat_q, y, prompt) for y in seqs])
    per_position = np.zeros(space.horizon)
    epsilon = 0.0
    for prefix in active_prefixes(space):
        t = len(prefix)
        extends = np.array([tuple(y[:t]) == prefix for y in seqs])
        mass_q = logsumexp_np(log_q[extends])
        mass_p = logsumexp_np(log_p[extends])
        if mass_q == -np.inf and mass_p == -np.inf:
            continue
        pi_p = target_policy(r, lat_r, prefix, prompt)
        pi_q = table_policy(q, lat_q, prefix, prompt)
        epsilon = max(epsilon, half_range_np(pi_p, pi_q))
        if mass_q > -np.inf:
            kl = kl_np(pi_q, pi_p)
            per_position[t] += np.inf if kl == np.inf else np.exp(mass_q) * kl
    return {
        "kl_reverse": kl_np(log_q, log_p),
        "kl_forward": kl_np(log_p, log_q),
        "tv": 0.5 * float(np.abs(np.exp(log_p) - np.exp(log_q)).sum()),
        "per_position_kl": per_position,
        "logit_error": epsilon,
    }


def backward_values_np(r, delta, horizon: int, eos_id=None) -> np.ndarray:
    """``V[0]`` ``[S]`` of a homogeneous table ``r [S, A]`` by a float64 log-space scan in NumPy
    (``V[T] = 0``, or −∞ with EOS; EOS leads to value 0): the DP's oracle where enumeration is
    out of reach."""
    S, A = r.shape
    v = np.full(S, -np.inf if eos_id is not None else 0.0)
    for _ in range(horizon):
        following = (
            np.where(np.arange(A) == eos_id, 0.0, v[delta]) if eos_id is not None else v[delta]
        )
        v = logsumexp_np(r + following, axis=-1)
    return v
