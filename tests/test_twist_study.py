"""The twist study's pieces (models/twist_study.py, models/twist_figures.py) against brute force,
and the particle-scaling benchmark's quick run with its resume (slow)."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from seqppl.models import twist_study as ts
from seqppl.models.twist_figures import particle_ratio

import seqppl as sp

ROOT = Path(__file__).resolve().parents[1]


def _tiny():
    """``(callable trigram base, bigram, DFA)`` over 3 letters, at most 4 of them."""
    space = sp.SequenceSpace(3, 4, eos=True)
    rng = np.random.default_rng(0)
    trigram = sp.Lattice.markov(space, 2)
    table = sp.ARM.from_table(trigram, jnp.asarray(rng.standard_normal((trigram.num_states, 4))))
    base = sp.ARM(lambda y: table.logits(y), space)
    markov = sp.Lattice.markov(space, 1)
    bigram = sp.ARM.from_table(markov, jnp.asarray(rng.standard_normal((markov.num_states, 4))))
    return base, bigram, sp.Lattice.regex(space, "(?:ab)+c?", ["a", "b", "c"])


def test_table_twist_from_a_lattice_is_the_base_prefix_plus_the_bigram_acceptance_probability():
    """``Φ_t = log p_base(y_{≤t}) + log P_bigram(accepted | y_{≤t})`` on every prefix, by
    enumeration (−∞ exactly where the bigram cannot accept any more)."""
    base, bigram, dfa = _tiny()
    approx = bigram.constrain(dfa)
    space = base.space
    y = np.asarray(space.enumerate())
    phi = np.asarray(sp.TableTwist.from_lattice(base, approx).log_phi(jnp.asarray(y)))
    steps = np.take_along_axis(np.asarray(base.log_policies(jnp.asarray(y))), y[..., None], -1)
    log_bigram = np.asarray(bigram.log_prob(jnp.asarray(y)))
    accepted = np.isfinite(np.asarray(approx.unnormalized_log_prob(jnp.asarray(y))))
    checked = 0
    for n, row in enumerate(y):
        for t in range(space.horizon - 1):
            if t and row[t - 1] == space.eos_id:
                break
            same = (y[:, : t + 1] == row[: t + 1]).all(1)
            good = np.logaddexp.reduce(np.where(same & accepted, log_bigram, -np.inf))
            want = steps[n, : t + 1, 0].sum() + good - np.logaddexp.reduce(log_bigram[same])
            assert want == phi[n, t] == -np.inf or abs(want - phi[n, t]) < 1e-4, (row, t)
            checked += 1
    assert checked > 100


def test_particle_metrics_against_a_hand_computation():
    sequences = np.array([[0, 9], [1, 9], [2, 9]], np.int32)
    log_p = np.log([0.5, 0.3, 0.2])
    index = {row.tobytes(): i for i, row in enumerate(sequences)}
    target = ts.ExactTarget(sequences, log_p, -2.0, index)
    tokens = np.array([[0, 9], [0, 9], [1, 9], [5, 5]], np.int32)  # the last one ran away
    log_w = np.array([0.0, 0.0, np.log(2.0), -np.inf]) - 2.0
    m = ts.particle_metrics(target, tokens, log_w, eos_id=9)
    p_hat = np.array([0.5, 0.5])  # sequences 0 and 1
    assert m["missing"] == pytest.approx(0.2)
    assert m["tv"] == pytest.approx(0.5 * (0.0 + 0.2 + 0.2))
    assert m["kl_rev"] == pytest.approx(np.sum(p_hat * np.log(p_hat / [0.5, 0.3])))
    assert m["kl_fwd"] == np.inf
    assert m["runaway"] == 0.25 and m["accepted"] == 0.75
    assert m["log_z_error"] == pytest.approx(np.log(1.0))  # mean weight e^-2 · 1 = Z
    assert m["ess"] == pytest.approx(16 / 6 / 4)
    covered = ts.particle_metrics(target, sequences, np.log([0.5, 0.3, 0.2]) - 2, 9)
    assert covered["missing"] == 0 and covered["tv"] < 1e-12 and abs(covered["kl_fwd"]) < 1e-12
    empty = ts.particle_metrics(target, tokens, np.full(4, -np.inf), 9)
    assert empty["tv"] == 1 and np.isnan(empty["kl_rev"]) and empty["log_z_error"] == -np.inf


def _cells(curves: dict, seeds=4):
    """Fabricated cells: ``{sampler: TV per grid point}``, the same for every seed (plus noise)."""
    rng = np.random.default_rng(0)
    cells = {}
    for sampler, tvs in curves.items():
        for p, tv in zip([10, 100, 1000], tvs, strict=True):
            runs = [{"tv": tv + 0.001 * rng.standard_normal()} for _ in range(seeds)]
            cells[f"c/{sampler}/{p}"] = {"runs": runs, "pooled": {}, "seconds": 0.0}
    return cells


def test_particle_ratio_interpolates_and_censors():
    cells = _cells({"smc": [0.9, 0.8, 0.6], "a": [0.8, 0.6, 0.4], "b": [0.5, 0.4, 0.3]})
    a = particle_ratio(cells, "c", "a", boots=200)
    assert a["censored"] == 0 and a["particles"] == pytest.approx(100, rel=0.05)
    assert a["ratio"] == pytest.approx(10, rel=0.05) and a["low"] <= a["ratio"] <= a["high"]
    b = particle_ratio(cells, "c", "b", boots=200)
    assert b["censored"] == -1 and b["ratio"] == 100  # a lower bound
    never = particle_ratio(_cells({"smc": [0.9, 0.8, 0.6], "d": [0.99] * 3}), "c", "d")
    assert never["censored"] == 1


@pytest.mark.slow
def test_benchmark_quick_run_writes_its_tables_and_resumes(tmp_path):
    """--quick: every cell, the CSVs and figures; a second run recomputes no cell."""
    script = ROOT / "benchmarks" / "twist_scaling.py"
    command = [sys.executable, str(script), "--quick", "--out", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = (tmp_path / "cells.json").read_bytes()
    cells = json.loads(saved)
    with open(tmp_path / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 2 * len(cells)  # two seeds per cell
    assert {"tv", "kl_rev", "missing", "ess", "runaway", "log_z_error"} <= set(runs[0])
    for case in ("enumerable", "long"):
        assert (tmp_path / f"twist-scaling-{case}.png").stat().st_size > 0
    assert "Measured:" in (tmp_path / "summary.md").read_text()
    second = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"{len(cells)} cells, {len(cells)} done" in second.stdout
    assert (tmp_path / "cells.json").read_bytes() == saved
