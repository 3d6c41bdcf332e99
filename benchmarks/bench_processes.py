"""Time and memory against the number of processes of one jax.distributed job: importance
sampling of 10⁷ draws and a distillation step (forward KL, 2¹⁶ draws), over 1, 2 and 4 local
processes with one CPU device each (``seqppl.processes.start_local``).

Each process count is its own job, and IS and distillation are separate jobs, so that the peak
RSS of each process (``ru_maxrss``: jax runtime, compiled programs and the work's buffers) is
that work's. Times are process 0's: compile + first run, then the median of ``--repeats`` runs
(the IS estimate includes its per-chunk host reads and the final gather of the kept draws), and
the CPU seconds of a run summed over the processes (every thread; on a shared machine the wall
time also carries others' load). The 1-process run is the peer: every process count must give
its log Z and loss first.

    python benchmarks/bench_processes.py           # 10⁷ draws, 1, 2, 4 processes (minutes)
    python benchmarks/bench_processes.py --tiny    # the smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

WORKER = "--worker"
CHUNK = 2**17
"""IS draws per chunk at every process count (the draws depend on it)."""


def _model():
    import jax
    import numpy as np

    import seqppl as sp

    space = sp.SequenceSpace(vocab_size=16, length=16, eos=False)
    lat = sp.Lattice.markov(space, 1)
    rewards = np.random.default_rng(0).standard_normal((lat.num_states, 16)).astype(np.float32)
    ebm = sp.EBM.from_table(lat, rewards)
    return jax, sp, ebm, sp.to_arm(ebm.tempered(0.9)), lat


def worker(kind: str, size: int, repeats: int, out: Path) -> None:
    """One process of a job: ``kind`` is "is" (``size`` draws) or "distill" (``size`` draws per
    step); writes ``out/result-I.json``."""
    from seqppl import processes
    from seqppl.objectives import objective_loss
    from seqppl.sharding import global_mesh, replicate

    index, count = processes.initialize()
    jax, sp, ebm, arm, lat = _model()
    mesh = global_mesh()
    key = jax.random.key(1)
    if kind == "is":

        def fn(key):
            est = sp.log_partition(
                ebm, "is", arm, size, key, chunk_size=CHUNK, progress=False,
                target_samples=None, mesh=mesh,
            )  # fmt: skip
            return est.log_z

    else:
        student = sp.ARM.from_table(lat, jax.numpy.zeros((lat.num_states, 16)))
        loss, _, _ = objective_loss(ebm, student, "forward_kl", key, size, "auto", "student", mesh)
        step = jax.jit(jax.value_and_grad(lambda p: loss(p, 0, None)[0]))
        params = replicate(student.params, mesh)

        def fn(key):
            value, grads = step(params)
            return float(value) + 0.0 * float(grads.sum())

    start = time.perf_counter()
    value = fn(key)  # compile + first run
    first = time.perf_counter() - start
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()  # all of this process's threads
        fn(key)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    result = {"process": index, "processes": count, "first": first}
    result.update(steady=statistics.median(walls), cpu=statistics.median(cpus))
    result.update(value=float(value), peak_rss_mb=_peak_rss_mb())
    (out / f"result-{index}.json").write_text(json.dumps(result))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def job(kind: str, num_processes: int, size: int, repeats: int) -> list[dict]:
    """The results of every process of one job of ``worker``."""
    from seqppl import processes

    with tempfile.TemporaryDirectory() as folder:
        argv = [__file__, WORKER, kind, str(size), str(repeats), folder]
        env = {"PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.getcwd()])}
        launched = processes.start_local(argv, num_processes, output_dir=folder, env=env)
        codes = processes.wait_all(launched, timeout=3600)
        if any(codes):
            sys.exit(
                f"{kind} with {num_processes} processes: {processes.describe(launched, codes)}"
            )
        return [
            json.loads((Path(folder) / f"result-{i}.json").read_text()) for i in range(len(codes))
        ]


def main():
    if len(sys.argv) > 1 and sys.argv[1] == WORKER:
        kind, size, repeats, out = sys.argv[2:6]
        worker(kind, int(size), int(repeats), Path(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    counts, draws, step_draws = ((1, 2), 10**5, 2**10) if args.tiny else ((1, 2, 4), 10**7, 2**16)
    rows = {}
    for kind, size in (("is", draws), ("distill", step_draws)):
        for n in counts:
            rows[kind, n] = job(kind, n, size, args.repeats)
            peer, got = rows[kind, counts[0]][0]["value"], rows[kind, n][0]["value"]
            if abs(got - peer) > 1e-4 * max(1.0, abs(peer)):  # float32 sums in another order
                sys.exit(f"{kind}: {n} processes give {got}, 1 process {peer}")
    import jax

    load = os.getloadavg()[0]
    print(f"jax {jax.__version__}, CPU ({os.cpu_count()} cores, load {load:.1f}), float32, one")
    print(f"device per process; IS of {draws:,} draws (V = 16, T = 16, chunks of {CHUNK:,}) and")
    print(f"a forward-KL distillation step of {step_draws:,} draws; median of {args.repeats}\n")
    print("| work | processes | compile+first (s) | steady (s) | rate (draws/s) | CPU s, all "
          "processes | peak RSS per process (MB) | total RSS (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for (kind, n), results in rows.items():
        lead = results[0]
        size = draws if kind == "is" else step_draws
        rss = [r["peak_rss_mb"] for r in results]
        print(
            f"| {'IS' if kind == 'is' else 'distill step'} | {n} | {lead['first']:.2f} | "
            f"{lead['steady']:.3g} | {size / lead['steady']:.3g} | "
            f"{sum(r['cpu'] for r in results):.3g} | {max(rss):.0f} | "
            f"{sum(rss):.0f} |"
        )


if __name__ == "__main__":
    main()
