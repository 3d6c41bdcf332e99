"""Particle-scaling curves of SMC under a regex constraint, against the exact target.

The base is a character Transformer trained on the words of the stdlib docstrings
(``seqppl.models.twist_study``); no lattice holds it, so base × constraint has no exact M.
Two cases (the proposal is always the base):

- ``enumerable``: acronyms ``[A-Z]{2,4}`` among words of at most 10 characters. The 475,228
  accepted sequences are listed and scored, so the target ``p ∝ p_base · 1[accepted]`` and
  ``log Z = log P_base(accepted)`` are exact;
- ``long``: CamelCase names ``[A-Z][a-z]+(?:[A-Z][a-z]+)+`` among words of at most 16
  characters, too many to list: only the estimators' intervals.

Samplers: IS; SMC with no twist; the lattice twist ``twist=bigram.constrain(dfa)`` (a bigram
fit by ``sp.fit`` to the base's samples); the same lattice's soft values on the base's own
prefix probability (``sp.TableTwist.from_lattice``); the learned twist ``sp.fit_twist``; and, on the
enumerable case, exact draws as the reference. Per particle count P and seed (one run of P
particles; SMC runs the seeds as the replicates of one call, IS splits P·seeds draws into
blocks): TV, KL(p̂ ‖ p), the target mass p̂ misses (KL(p ‖ p̂) is ∞ while it is positive),
log Ẑ − log Z, ESS per particle, the runaway rate; per cell the pooled estimate and interval.

Every finished cell (case, sampler, P: all its seeds) is written to OUT/cells.json at once,
atomically; a rerun with the same settings skips the finished cells (Ctrl-C loses only the
cell in progress). Then OUT/runs.csv, OUT/cells.csv, OUT/summary.md and the figures.

    python benchmarks/twist_scaling.py [--quick] [--out DIR] [--seeds N]
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import jax
import numpy as np
from seqppl.models import twist_study as ts
from seqppl.models.twist_figures import SAMPLERS, scaling_figures, summary_markdown

import seqppl as sp
from seqppl.loop import write_atomically
from seqppl.progress import progress_bar

FULL = {
    "base": ts.BaseConfig()._asdict(),
    "cases": {
        "enumerable": {
            "length": 10,
            "pattern": "[A-Z]{2,4}",
            "grid": [10, 32, 100, 316, 1000, 3162, 10000],
            "enumerable": True,
        },
        "long": {
            "length": 16,
            "pattern": "[A-Z][a-z]+(?:[A-Z][a-z]+)+",
            "grid": [10, 100, 1000, 10000],
            "enumerable": False,
        },
    },
    "seeds": 16,
    "bigram": {"num_samples": 20_000, "steps": 500},
    "learned": {"num_sequences": 4096, "steps": 500},
}
QUICK = {
    "base": ts.BaseConfig(
        max_files=40, length=8, layers=1, heads=2, dim=16, mlp_dim=32, steps=40, batch_size=64
    )._asdict(),
    "cases": {
        "enumerable": {"length": 6, "pattern": "[A-Z]{2,3}", "grid": [10, 100], "enumerable": True},
        "long": {
            "length": 8,
            "pattern": "[A-Z][a-z]+[A-Z][a-z]+",
            "grid": [100],
            "enumerable": False,
        },
    },
    "seeds": 2,
    "bigram": {"num_samples": 2000, "steps": 50},
    "learned": {"num_sequences": 256, "steps": 20},
}


class Case:
    """One constraint's set-up: the base over its space, the DFA, the target EBM, the twists
    by sampler and, when enumerable, the ``ExactTarget``."""

    def __init__(self, index, name, spec, module, params, settings, out: Path):
        self.key = jax.random.fold_in(jax.random.key(settings["base"]["seed"]), index)
        self.name, self.spec = name, spec
        self.base = ts.base_on(module, params, spec["length"])
        self.dfa = sp.Lattice.regex(self.base.space, spec["pattern"], ts.TEXTS)
        self.target = self.base.constrain(self.dfa)
        self.exact = _cached_target(self, out / f"exact_{name}.npz") if spec["enumerable"] else None
        bigram = ts.bigram_fit(
            self.base,
            self.key,
            checkpoint_dir=out / "checkpoints" / f"bigram_{name}",
            **settings["bigram"],
        )
        self.approx = bigram.constrain(self.dfa)
        self.approx_log_z = float(self.approx.log_partition())
        learned = None
        if hasattr(sp, "fit_twist"):
            learned, _ = sp.fit_twist(
                self.base,
                self.dfa,
                jax.random.fold_in(self.key, 1),
                checkpoint_dir=out / "checkpoints" / f"twist_{name}",
                progress=False,
                **settings["learned"],
            )
        self.twists = {
            "smc": None,
            "smc_lattice": self.approx,
            "smc_lookahead": sp.TableTwist.from_lattice(self.base, self.approx),
            "smc_learned": learned,
        }

    def samplers(self) -> list[str]:
        """The samplers this case runs (no learned twist without ``sp.fit_twist``)."""
        names = [s for s in SAMPLERS if s != "smc_learned" or self.twists[s] is not None]
        return [s for s in names if s != "exact" or self.exact is not None]


def _cached_target(case: Case, path: Path) -> ts.ExactTarget:
    """The exact target, scored once and kept in ``path`` (a rerun reads it back)."""
    if path.exists():
        with np.load(path) as saved:
            sequences, log_p, log_z = saved["sequences"], saved["log_p"], float(saved["log_z"])
        index = {row.tobytes(): i for i, row in enumerate(sequences)}
        return ts.ExactTarget(sequences, log_p, log_z, index)
    exact = ts.exact_target(case.base, case.dfa)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, sequences=exact.sequences, log_p=exact.log_p, log_z=exact.log_z)
    tmp.replace(path)
    return exact


def run_cell(case: Case, sampler: str, particles: int, seeds: int, key) -> dict:
    """One cell: ``seeds`` independent runs of ``particles`` particles; per-run metrics and the
    pooled estimate (``log mean_r Ẑ_r`` for SMC, all ``particles · seeds`` draws for IS)."""
    eos = case.base.space.eos_id
    started = time.perf_counter()
    if sampler == "exact":
        runs = [ts.exact_draws(case.exact, particles, seed) for seed in range(seeds)]
        pooled = {"log_z": case.exact.log_z, "stderr": 0.0, "low": case.exact.log_z}
        pooled |= {"high": case.exact.log_z, "warned": False}
    else:
        options = {"progress": False}
        if sampler != "is":
            options = {"num_replicates": seeds, "twist": case.twists[sampler]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", sp.EstimateWarning)
            est = sp.log_partition(
                case.target,
                "is" if sampler == "is" else "smc",
                case.base,
                particles * seeds,
                key,
                max_kept=particles * seeds,
                target_samples=None,
                **options,
            )
        tokens, log_w = ts.run_arrays(est, seeds)
        runs = list(zip(tokens, log_w, strict=True))
        low, high = est.interval
        pooled = {"log_z": est.log_z, "stderr": est.stderr, "low": low, "high": high}
        pooled["warned"] = bool(caught)
    if case.exact is not None:
        metrics = [ts.particle_metrics(case.exact, t, w, eos) for t, w in runs]
    else:
        metrics = [ts.weight_metrics(t, w, eos) for t, w in runs]
    return {"runs": metrics, "pooled": pooled, "seconds": time.perf_counter() - started}


def _settings_file(out: Path, settings: dict) -> None:
    """Writes ``run.json``, or refuses a folder that holds cells of other settings."""
    path = out / "run.json"
    if path.exists() and json.loads(path.read_text()) != json.loads(json.dumps(settings)):
        raise SystemExit(
            f"{out} holds the cells of a run with other settings ({path}); use another --out"
        )
    write_atomically(path, json.dumps(settings, indent=1).encode())


def _load_cells(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def write_tables(out: Path, cells: dict) -> None:
    """``runs.csv`` (one row per case, sampler, P and seed) and ``cells.csv`` (per cell)."""
    runs, pooled = [], []
    for name, cell in cells.items():
        case, sampler, particles = name.split("/")
        head = {"case": case, "sampler": sampler, "particles": int(particles)}
        runs += [{**head, "seed": seed, **m} for seed, m in enumerate(cell["runs"])]
        pooled.append({**head, **cell["pooled"], "seconds": round(cell["seconds"], 2)})
    for file, rows in (("runs.csv", runs), ("cells.csv", pooled)):
        fields = list(dict.fromkeys(k for row in rows for k in row))
        with open(out / file, "w", newline="") as f:
            writer = csv.DictWriter(f, fields)
            writer.writeheader()
            writer.writerows(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny base and grid (seconds)")
    parser.add_argument("--out", type=Path, default=Path("twist_scaling_out"))
    parser.add_argument("--seeds", type=int, help="runs per cell (default 16; 2 with --quick)")
    args = parser.parse_args(argv)
    settings = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.seeds is not None:
        settings["seeds"] = args.seeds
    settings["table_twist"] = hasattr(sp, "fit_twist")
    args.out.mkdir(parents=True, exist_ok=True)
    _settings_file(args.out, settings)
    cells_path = args.out / "cells.json"
    cells = _load_cells(cells_path)
    started = time.perf_counter()

    config = ts.BaseConfig(**settings["base"])
    module, params, _ = ts.train_base(config, args.out / "checkpoints" / "base", progress=True)
    cases = {
        name: Case(index, name, spec, module, params, settings, args.out)
        for index, (name, spec) in enumerate(settings["cases"].items())
    }
    todo = [
        (case, sampler, particles)
        for case in cases.values()
        for particles in case.spec["grid"]
        for sampler in case.samplers()
    ]
    print(f"set-up {time.perf_counter() - started:.0f} s; {len(todo)} cells, {len(cells)} done")
    bar = progress_bar(total=len(todo), progress=True, desc="twist scaling")
    try:
        for case, sampler, particles in todo:
            name = f"{case.name}/{sampler}/{particles}"
            if name not in cells:
                key = jax.random.fold_in(case.key, particles)
                cells[name] = run_cell(case, sampler, particles, settings["seeds"], key)
                write_atomically(cells_path, json.dumps(cells, indent=0).encode())
            bar.update()
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: {len(cells)} cells kept in {cells_path}; rerun to resume")
        return 130
    bar.close()
    write_tables(args.out, cells)
    context = {name: {"approx_log_z": c.approx_log_z} for name, c in cases.items()}
    for name, c in cases.items():
        if c.exact is not None:
            context[name] |= {"log_z": c.exact.log_z, "accepted": len(c.exact.log_p)}
    machine = f"{platform.machine()}, {jax.device_count()} {jax.default_backend()} device(s)"
    summary = summary_markdown(cells, settings, context, machine)
    (args.out / "summary.md").write_text(summary)
    for file, fig in scaling_figures(cells, settings, context).items():
        fig.savefig(args.out / file, dpi=110)
    print(summary)
    print(f"wall time {time.perf_counter() - started:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
