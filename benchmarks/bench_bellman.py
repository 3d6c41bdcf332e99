"""Throughput of the soft-Bellman DP, side by side with plain-jnp scans and brute force.

Cells per second = T·S·A / steady-state seconds (compile timed separately; median of the runs,
each ended by ``block_until_ready``). Every comparison first asserts that both sides agree.

    python benchmarks/bench_bellman.py            # the sizes of the issue (minutes on 2 cores)
    python benchmarks/bench_bellman.py --tiny     # seconds: the smoke run the tests use
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import seqppl as sp


def timed(fn, *args, repeats: int = 5):
    """(compile + first run seconds, median steady-state seconds, result)."""
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), out


def print_timing_table(what: str, who: str, rate: str, rows):
    """A markdown table of ``timed`` results: rows ``(what, who, compile+first s, steady s[,
    rate])``; a numeric rate prints as ``.3g``, a string as is, None or a missing one as ``-``."""
    print(f"| {what} | {who} | compile+first (s) | steady (ms) | {rate} |")
    print("|---|---|---|---|---|")
    for first_column, second_column, compile_s, steady, *value in rows:
        value = value[0] if value else None
        shown = "-" if value is None else value if isinstance(value, str) else f"{value:.3g}"
        print(
            f"| {first_column} | {second_column} | {compile_s:.2f} | {steady * 1e3:.2f} | {shown} |"
        )


def plain_backward(delta, r, horizon):
    """The textbook scan in plain jnp: V_t = logsumexp(r + V_{t+1}[δ]) (fixed length, [S, A])."""

    def step(v_next, _):
        v = jax.nn.logsumexp(r + v_next[delta], axis=-1)
        return v, v

    return jax.lax.scan(step, jnp.zeros(r.shape[0], r.dtype), None, length=horizon)[1]


def plain_backward_broadcast(next_row, r, horizon):
    """Plain jnp for a lattice whose next state depends on the action only: V_{t+1}[δ(a)]."""

    def step(v_next, _):
        v = jax.nn.logsumexp(r + v_next[next_row][None, :], axis=-1)
        return v, v

    return jax.lax.scan(step, jnp.zeros(r.shape[0], r.dtype), None, length=horizon)[1]


def dp_case(name, lat, r, repeats, rows):
    T, S, A = lat.space.horizon, lat.num_states, lat.space.num_actions
    cells = T * S * A
    values_fn = jax.jit(lambda t: sp.soft_values(lat, t))
    full_fn = jax.jit(lambda t: sp.soft_bellman(lat, t))
    delta = jnp.asarray(lat.delta)
    plain_fn = jax.jit(lambda t: plain_backward(delta, t, T))
    c_v, t_v, values = timed(values_fn, r, repeats=repeats)
    c_p, t_p, plain = timed(plain_fn, r, repeats=repeats)
    np.testing.assert_allclose(values[0], plain[-1], rtol=1e-4)  # the same V_0
    entries = [("soft_values", c_v, t_v), ("plain jnp scan (gather)", c_p, t_p)]
    if lat.next_state_ignores_state:
        row = delta[0]
        bcast_fn = jax.jit(lambda t: plain_backward_broadcast(row, t, T))
        c_b, t_b, bcast = timed(bcast_fn, r, repeats=repeats)
        np.testing.assert_allclose(bcast[-1], plain[-1], rtol=1e-4)
        entries.append(("plain jnp scan (broadcast)", c_b, t_b))
    c_f, t_f, (q, _) = timed(full_fn, r, repeats=repeats)
    entries.append(("soft_bellman (writes q)", c_f, t_f))
    del q
    for label, compile_s, steady in entries:
        rows.append((name, label, compile_s, steady, cells / steady))
    best_plain = min(t for label, _, t in entries if label.startswith("plain"))
    return t_v, best_plain


def brute_vs_dp(rows, repeats):
    space = sp.SequenceSpace(vocab_size=4, length=8)
    lat = sp.Lattice.markov(space, order=1)
    r = jax.random.normal(jax.random.key(0), (lat.num_states, space.num_actions))
    seqs = jnp.asarray(space.enumerate())
    dp_fn = jax.jit(lambda t: sp.soft_values(lat, t)[0, lat.initial])
    brute_fn = jax.jit(lambda t: sp.logsumexp(lat.path_scores(t, seqs).sum(-1), -1))
    c_d, t_d, dp = timed(dp_fn, r, repeats=repeats)
    c_b, t_b, brute = timed(brute_fn, r, repeats=repeats)
    np.testing.assert_allclose(dp, brute, rtol=1e-5)
    rows.append(("V=4 T=8 markov(1), log Z", "DP soft_values", c_d, t_d, None))
    rows.append(("V=4 T=8 markov(1), log Z", f"enumeration of {len(seqs)} seqs", c_b, t_b, None))
    return t_b / t_d


def path_vs_tree(rows, repeats):
    space = sp.SequenceSpace(vocab_size=4, length=8)
    tree = sp.Lattice.prefix_tree(space)
    q = jax.random.normal(jax.random.key(1), (space.horizon, tree.num_states, space.num_actions))
    y = jnp.asarray(space.enumerate()[12345])
    tree_fn = jax.jit(lambda t: sp.inverse_soft_bellman(tree, t))
    logits_fn = jax.jit(lambda t: t[jnp.arange(space.horizon), tree.states(y)])
    path_fn = jax.jit(lambda t: sp.path_rewards(logits_fn(t), y, space))
    c_t, t_t, r_tree = timed(tree_fn, q, repeats=repeats)
    c_p, t_p, r_path = timed(path_fn, q, repeats=repeats)
    np.testing.assert_allclose(tree.path_scores(r_tree, y), r_path, rtol=1e-5, atol=1e-5)
    rows.append(
        ("V=4 T=8 prefix tree, M⁻¹", f"full tree ({tree.num_states} states)", c_t, t_t, None)
    )
    rows.append(("V=4 T=8 prefix tree, M⁻¹", "path-wise, one path", c_p, t_p, None))
    return t_t / t_p


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    markov_v, auto_s, horizon = (100, 512, 16) if args.tiny else (1000, 65536, 256)
    rows = []
    space = sp.SequenceSpace(vocab_size=markov_v, length=horizon)
    markov = sp.Lattice.markov(space, order=1)
    r = jax.random.normal(jax.random.key(2), (markov.num_states, space.num_actions))
    ours_m, plain_m = dp_case(
        f"markov(1) S={markov.num_states} A={markov_v} T={horizon}", markov, r, args.repeats, rows
    )
    space = sp.SequenceSpace(vocab_size=64, length=horizon)
    delta = np.random.default_rng(3).integers(0, auto_s, size=(auto_s, 64))
    auto = sp.Lattice.automaton(space, delta)
    r = jax.random.normal(jax.random.key(4), (auto_s, 64))
    ours_a, plain_a = dp_case(f"automaton S={auto_s} A=64 T={horizon}", auto, r, args.repeats, rows)
    brute_ratio = brute_vs_dp(rows, args.repeats)
    tree_ratio = path_vs_tree(rows, args.repeats)

    print(f"jax {jax.__version__}, device {jax.devices()[0]}, float32\n")
    print_timing_table("problem", "routine", "cells/s", rows)
    print()
    print(f"markov:    seqppl / best plain time = {ours_m / plain_m:.2f} (<= 1.25 is within 80%)")
    print(f"automaton: seqppl / best plain time = {ours_a / plain_a:.2f}")
    print(
        f"enumeration / DP time = {brute_ratio:.1f}x; full-tree M⁻¹ / path-wise = {tree_ratio:.1f}x"
    )


if __name__ == "__main__":
    main()
