"""How time and memory grow: the DP with T and S·A, sequential vs parallel in time, importance
sampling with the number of draws, and IS and training over forced host devices.

Times are medians of steady-state runs (compile excluded), each ended by ``block_until_ready``;
memory is the bytes of the arrays the routine returns plus XLA's temporary buffers
(``compiled.memory_analysis()``). Device scaling runs each device count in its own process
(``XLA_FLAGS=--xla_force_host_platform_device_count=N``, set before jax starts): on a CPU those
devices share the same cores, so the figure shows the partitioning's overhead, not a speed-up.

    python benchmarks/bench_scaling.py                 # full sizes (a few minutes on 2 cores)
    python benchmarks/bench_scaling.py --tiny          # the smoke run
    python benchmarks/bench_scaling.py --plot FILE     # also draw the four panels
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import jax
import numpy as np
from bench_bellman import timed
from jax.sharding import Mesh

import seqppl as sp
from seqppl import importance, sharding, train
from seqppl.estimate import DefensiveMixture

DEVICE_WORKER = "--device-worker"


def memory_bytes(fn, *args) -> int:
    stats = fn.lower(*args).compile().memory_analysis()
    return int(stats.output_size_in_bytes + stats.temp_size_in_bytes) if stats else -1


def automaton_rewards(states: int, actions: int, horizon: int, seed: int = 0):
    space = sp.SequenceSpace(vocab_size=actions, length=horizon)
    delta = np.random.default_rng(seed).integers(0, states, size=(states, actions))
    lat = sp.Lattice.automaton(space, delta)
    r = jax.random.normal(jax.random.key(seed), (horizon, states, actions))
    return lat, r


def dp_scaling(horizons, sizes, repeats):
    """Rows (kind, S, A, T, method, seconds, bytes) for soft_values."""
    rows = []
    for states, actions in sizes:
        for horizon in horizons:
            lat, r = automaton_rewards(states, actions, horizon)
            results = {}
            for method in ("sequential", "parallel"):
                if method == "parallel" and states > 64:
                    continue  # O(T·S³) work: not meant for many states
                fn = jax.jit(lambda t, m=method, lat=lat: sp.soft_values(lat, t, method=m))
                results[method] = fn(r)
                rows.append(
                    ("dp", states, actions, horizon, method,
                     timed(fn, r, repeats=repeats)[1], memory_bytes(fn, r))
                )  # fmt: skip
            if "parallel" in results:
                np.testing.assert_allclose(
                    results["parallel"], results["sequential"], rtol=1e-4, atol=1e-4
                )
    return rows


def is_scaling(sample_counts, repeats):
    """Rows ("is", S, A, T, draws, seconds, bytes): IS from a V=64 Markov(1) lattice ARM."""
    space = sp.SequenceSpace(vocab_size=64, length=64)
    lat = sp.Lattice.markov(space, 1)
    ebm = sp.EBM.from_table(lat, jax.random.normal(jax.random.key(0), (lat.num_states, 64)))
    proposal = DefensiveMixture(sp.to_arm(ebm.tempered(0.9)))
    rows = []
    for count in sample_counts:
        fn = jax.jit(lambda key, n=count: importance.importance_chunk(ebm, proposal, key, n, n)[2])
        seconds = timed(fn, jax.random.key(1), repeats=repeats)[1]
        rows.append(
            ("is", lat.num_states, 64, 64, count, seconds, memory_bytes(fn, jax.random.key(1)))
        )
    return rows


def device_worker(draws: int, repeats: int) -> dict:
    """In a process with N forced devices: IS chunk and one data-parallel training step."""
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    space = sp.SequenceSpace(vocab_size=64, length=64)
    lat = sp.Lattice.markov(space, 1)
    ebm = sp.EBM.from_table(lat, jax.random.normal(jax.random.key(0), (lat.num_states, 64)))
    arm = sp.to_arm(ebm.tempered(0.9))
    proposal = DefensiveMixture(arm)
    is_fn = jax.jit(
        lambda key: importance.importance_chunk(ebm, proposal, key, draws, draws, mesh)[2]
    )
    data = arm.sample(jax.random.key(2), (draws // 4,))
    student = sp.ARM.from_table(lat, np.zeros((lat.num_states, 64), np.float32))
    loss = train.data_loss(student, data, draws // 4, jax.random.key(3), None, mesh)
    params = sharding.replicate(student.params, mesh)
    grad_fn = jax.jit(jax.grad(lambda p: loss(p, 0)))
    return {
        "devices": len(jax.devices()),
        "is_seconds": timed(is_fn, jax.random.key(1), repeats=repeats)[1],
        "grad_seconds": timed(grad_fn, params, repeats=repeats)[1],
    }


def device_scaling(counts, draws, repeats):
    rows = []
    for count in counts:
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}"}
        env["JAX_PLATFORMS"] = "cpu"
        done = subprocess.run(
            [sys.executable, __file__, DEVICE_WORKER, str(draws), str(repeats)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(
            ("devices", result["devices"], draws, result["is_seconds"], result["grad_seconds"])
        )
    return rows


def plot(path, dp_rows, is_rows, device_rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    for states, actions in sorted({(r[1], r[2]) for r in dp_rows}):
        for method, style in (("sequential", "-o"), ("parallel", "--s")):
            pts = [(r[3], r[5]) for r in dp_rows if r[1:3] == (states, actions) and r[4] == method]
            if pts:
                axes[0].loglog(
                    *zip(*pts, strict=True), style, label=f"S={states} A={actions} {method}"
                )
    axes[0].set(xlabel="T", ylabel="seconds", title="soft values vs T")
    horizon = max(r[3] for r in dp_rows)
    for method, style in (("sequential", "-o"), ("parallel", "-s")):
        pts = sorted((r[1] * r[2], r[5]) for r in dp_rows if r[3] == horizon and r[4] == method)
        mem = sorted(
            (r[1] * r[2], r[6] / 1e6) for r in dp_rows if r[3] == horizon and r[4] == method
        )
        if pts:
            axes[1].loglog(*zip(*pts, strict=True), style, label=f"{method}: seconds")
            axes[1].loglog(*zip(*mem, strict=True), ":" + style[-1], label=f"{method}: MB")
    axes[1].set(xlabel="S·A", title=f"soft values vs S·A (T={horizon})")
    axes[2].loglog([r[4] for r in is_rows], [r[5] for r in is_rows], "-o", label="seconds")
    axes[2].loglog([r[4] for r in is_rows], [r[6] / 1e9 for r in is_rows], ":o", label="GB")
    axes[2].set(xlabel="draws", title="IS, V=64 Markov(1), T=64")
    axes[3].plot([r[1] for r in device_rows], [r[3] for r in device_rows], "-o", label="IS chunk")
    axes[3].plot([r[1] for r in device_rows], [r[4] for r in device_rows], "-s", label="grad step")
    axes[3].set(xlabel="forced host devices (2 cores)", ylabel="seconds", title="data parallel")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == DEVICE_WORKER:
        print(json.dumps(device_worker(int(sys.argv[2]), int(sys.argv[3]))))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--plot", help="write the four panels to this PNG")
    args = parser.parse_args()
    if args.tiny:
        horizons, sizes, samples, devices, draws = (
            [16, 64],
            [(4, 4), (64, 4)],
            [1000, 4000],
            [1, 2],
            2048,
        )
    else:
        horizons = [64, 256, 1024, 4096]
        sizes = [(2, 4), (8, 4), (32, 4), (256, 16), (4096, 64)]
        samples, devices, draws = [10**3, 10**4, 10**5, 10**6], [1, 2, 4], 2**16
    dp_rows = dp_scaling(horizons, sizes, args.repeats)
    is_rows = is_scaling(samples, args.repeats)
    device_rows = device_scaling(devices, draws, args.repeats)

    print(f"jax {jax.__version__}, device {jax.devices()[0]}, float32\n")
    print("| soft values: S | A | T | method | ms | MB |")
    print("|---|---|---|---|---|---|")
    for _, states, actions, horizon, method, seconds, size in dp_rows:
        cells = f"| {states} | {actions} | {horizon} | {method} |"
        print(f"{cells} {seconds * 1e3:.3g} | {size / 1e6:.3g} |")
    print("\n| IS draws | ms | draws/s | MB |")
    print("|---|---|---|---|")
    for *_, count, seconds, size in is_rows:
        print(f"| {count} | {seconds * 1e3:.3g} | {count / seconds:.3g} | {size / 1e6:.3g} |")
    print(f"\n| forced devices | IS chunk of {draws} (ms) | data-parallel grad step (ms) |")
    print("|---|---|---|")
    for _, count, _, is_s, grad_s in device_rows:
        print(f"| {count} | {is_s * 1e3:.3g} | {grad_s * 1e3:.3g} |")
    crossover = {}
    for states, actions in sorted({(r[1], r[2]) for r in dp_rows}):
        wins = [
            r[3] for r in dp_rows
            if r[1:3] == (states, actions) and r[4] == "parallel"
            and r[5] < next(s[5] for s in dp_rows if s[1:4] == r[1:4] and s[4] == "sequential")
        ]  # fmt: skip
        crossover[states] = min(wins) if wins else None
    print("\nparallel beats sequential from T =", crossover, "(None: never at these T)")
    if args.plot:
        plot(args.plot, dp_rows, is_rows, device_rows)


if __name__ == "__main__":
    main()
