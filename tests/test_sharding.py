"""Data parallelism over a 4-device mesh equals the one-device run (tests/sharding_worker.py runs
both in a subprocess with 4 forced host devices)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

import seqppl as sp
from seqppl import checks

ROOT = Path(__file__).resolve().parents[1]


def test_a_four_device_mesh_gives_the_single_device_results():
    """One test (the worker runs once however pytest-xdist splits the module): 4 devices were
    used; IS and SMC estimates (log Z, stderr, kept samples) equal the one-device ones and
    estimate log Z; SMC under a constraint with a learned twist, a lattice twist and the
    conditional-SMC bound gives the one-device log Z and eubo (issue 21); IS draws are split
    250 per device; data-parallel fit and distill give the one-device losses and parameters,
    the batch split over the 4 devices."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.sharding_worker"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert results["devices"] == 4
    for method in ("is", "smc"):
        one, four = results[method]["log_z"]
        se_one, se_four = results[method]["stderr"]
        assert abs(one - four) <= 1e-12 * max(1.0, abs(one)), method
        assert abs(se_one - se_four) <= 1e-12, method
        assert results[method]["same_samples"], method
        assert abs(one - results["exact"]) < 4 * se_one, method  # and both estimate log Z
    for twist in ("learned", "lattice", "csmc"):
        one, four = results["smc_twisted"][twist]
        np.testing.assert_allclose(four, one, rtol=1e-12, err_msg=twist)
    assert results["is_shards"] == [[250, 6]] * 4  # 1,000 draws, 250 on each device
    assert results["is_devices"] == [0, 1, 2, 3]
    for objective in ("fit_data", "fit_risk", "distill_reverse_kl", "distill_forward_kl"):
        run = results[objective]
        np.testing.assert_allclose(run["loss"][1], run["loss"][0], rtol=1e-12, err_msg=objective)
        assert run["params_max_diff"] < 1e-12, objective
        assert run["layouts"][0] == [[1, True]], objective  # one device: the whole batch
        assert run["layouts"][1] == [[4, False]], objective  # the batch split over 4 devices


def test_mesh_must_be_a_mesh():
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        checks.check_mesh("cpu")
    space = sp.SequenceSpace(2, 2, eos=False)
    lat = sp.Lattice.markov(space, 0)
    ebm = sp.EBM.from_table(lat, np.zeros((1, 2)))
    with pytest.raises(TypeError, match="mesh"):
        sp.log_partition(ebm, "is", sp.to_arm(ebm), 100, jax.random.key(0), mesh=jax.devices())


def test_one_device_mesh_is_the_plain_run():
    space = sp.SequenceSpace(3, 3, eos=False)
    lat = sp.Lattice.markov(space, 1)
    ebm = sp.EBM.from_table(lat, np.random.default_rng(0).standard_normal((lat.num_states, 3)))
    mesh = Mesh(np.array(jax.devices()[:1]), ("batch",))
    runs = [
        sp.log_partition(ebm, "is", sp.to_arm(ebm.tempered(0.5)), 512, jax.random.key(1), mesh=m)
        for m in (None, mesh)
    ]
    assert runs[0].log_z == runs[1].log_z
