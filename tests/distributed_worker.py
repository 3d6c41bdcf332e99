"""One process of the jax.distributed jobs of tests/test_distributed.py (started by
``seqppl.processes.start_local``): IS, SMC, ``fit`` and ``distill`` over a mesh of every
process's devices; prints its results as JSON. ``problem`` and ``run`` also give the test's own
single-process reference (``mesh=None``), so both sides run the same code.

``python -m tests.distributed_worker OUT [--only NAMES] [--checkpoint-dir DIR] [--steps N]``
writes ``OUT/result-I.json`` (process I); the fault test kills one process of such a job once a
checkpoint exists, then starts it again. ``{process}`` in DIR is replaced by the process index.

Not a test module itself (the job's processes are started from the test).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import seqppl as sp
from seqppl import processes
from seqppl.estimate import DefensiveMixture
from seqppl.importance import importance_chunk
from seqppl.loop import CHECKPOINT_NAME, load_checkpoint
from seqppl.sharding import global_mesh

RUNS = ("is", "smc", "fit_data", "fit_risk", "distill_score_function", "distill_forward_kl")


@functools.cache
def problem() -> dict:
    """The tiny problem every run uses: a Markov(1) EBM with V = 3, at most 3 tokens (the same
    objects every time: jit's caches hit)."""
    space = sp.SequenceSpace(3, 3, eos=True)
    lat = sp.Lattice.markov(space, 1)
    rng = np.random.default_rng(0)
    rewards = rng.standard_normal((lat.num_states, space.num_actions))
    seqs = space.enumerate()
    logits = rng.standard_normal(len(seqs))
    return {
        "space": space,
        "ebm": sp.EBM.from_table(lat, rewards),
        "arm": sp.ARM.from_table(lat, 0.8 * rewards),  # a near proposal: no weight warnings
        "student": sp.ARM(_bigram_logits, space, params=np.zeros((space.num_actions + 1, 4))),
        "data": seqs[rng.integers(len(seqs), size=256)],
        "target": logits - np.logaddexp.reduce(logits),  # log ρ over space.enumerate()
    }


def _bigram_logits(table, tokens):
    """A callable student: the logits of each position from the token before it."""
    start = jnp.full_like(tokens[..., :1], table.shape[0] - 1)
    return table[jnp.concatenate([start, tokens[..., :-1]], -1)]


def run(name: str, mesh, checkpoint_dir=None, steps: int = 6) -> dict:
    """Run ``name`` of ``RUNS`` over ``mesh`` (None: one device): floats and nested lists. Long
    trainings (``steps`` > 20) log every 20 steps and checkpoint every 5, short ones every 2."""
    p, key = problem(), jax.random.key(3)
    if name in ("is", "smc"):
        options = {"chunk_size": 512, "progress": False} if name == "is" else {}
        est = sp.log_partition(
            p["ebm"], name, p["arm"], 1024, key, target_samples=None, mesh=mesh, **options
        )
        return {"log_z": est.log_z, "stderr": est.stderr, "samples": est.samples.tolist()}
    every = (20, 5) if steps > 20 else (2, 2)
    common = {"key": key, "progress": False, "checkpoint_dir": checkpoint_dir, "mesh": mesh}
    common.update(steps=steps, log_every=every[0], checkpoint_every=every[1])
    if name.startswith("fit"):
        data = {"data": p["data"]} if name == "fit_data" else {"target": p["target"]}
        trained, history = sp.fit(p["student"], batch_size=64, **data, **common)
    else:
        objective = "forward_kl" if name == "distill_forward_kl" else "reverse_kl"
        estimator = {"estimator": "score_function"} if objective == "reverse_kl" else {}
        trained, history = sp.distill(
            p["ebm"], p["student"], objective, num_samples=128, evaluate="exact", patience=100,
            **estimator, **common,
        )  # fmt: skip
    return {
        "loss": history["loss"].tolist(),
        "kl_reverse": history["kl_reverse"].tolist() if "kl_reverse" in history else None,
        "params": np.asarray(trained.params).tolist(),
        "params_local": bool(trained.params.is_fully_addressable),
    }


def shards() -> list:
    """``[rows, process]`` of each shard of an IS chunk that this process holds."""
    p = problem()
    tokens, _, _ = importance_chunk(  # the IS run's chunk size: compiled once
        p["ebm"], DefensiveMixture(p["arm"]), jax.random.key(3), 500, 512, global_mesh()
    )
    return [[s.data.shape[0], s.device.process_index] for s in tokens.addressable_shards]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--only", default=",".join(RUNS))
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    index, count = processes.initialize()
    try:
        out = {"process": index, "processes": count, "devices": len(jax.devices())}
        out["local_devices"] = len(jax.local_devices())
        out["shards"] = shards()
        for name in args.only.split(","):
            started = time.process_time()
            folder = args.checkpoint_dir and os.path.join(args.checkpoint_dir, name)
            folder = folder and folder.format(process=index)  # a folder per process: refused
            saved = Path(folder or ".") / CHECKPOINT_NAME
            resumed = load_checkpoint(saved, None)["step"] if folder and saved.exists() else 0
            out[name] = run(name, global_mesh(), folder, args.steps)
            out[name]["resumed_from"] = resumed
            out[name]["cpu_seconds"] = time.process_time() - started
    except jax.errors.JaxRuntimeError as error:
        processes.abandon(error)
    with open(os.path.join(args.out, f"result-{index}.json"), "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
