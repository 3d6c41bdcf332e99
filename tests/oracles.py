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
