"""Run by tests/test_sharding.py in a subprocess with 4 forced host devices: the same IS, SMC,
training and distillation runs on one device and over a 4-device mesh; prints the results as
JSON.

Not a test module itself (jax fixes its device count when it starts, and the suite's process
has one device).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

jax.config.update("jax_enable_x64", True)

import seqppl as sp  # noqa: E402
from seqppl import importance, train  # noqa: E402
from seqppl.estimate import DefensiveMixture  # noqa: E402


def main() -> dict:
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    space = sp.SequenceSpace(4, 5, eos=True)
    lat = sp.Lattice.markov(space, 1)
    rng = np.random.default_rng(0)
    ebm = sp.EBM.from_table(lat, rng.standard_normal((lat.num_states, space.num_actions)))
    arm = sp.to_arm(ebm.tempered(0.8))  # a near proposal: no weight warnings
    out = {"devices": len(jax.devices()), "exact": float(ebm.log_partition())}
    key = jax.random.key(3)
    for method in ("is", "smc"):
        runs = [
            sp.log_partition(ebm, method, arm, 4096, key, chunk_size=1024, progress=False, mesh=m)
            for m in (None, mesh)
        ]
        out[method] = {
            "log_z": [r.log_z for r in runs],
            "stderr": [r.stderr for r in runs],
            "same_samples": bool(np.array_equal(runs[0].samples, runs[1].samples)),
        }
    tokens, _, _ = importance.importance_chunk(
        ebm, DefensiveMixture(arm), key, 1000, 1000, mesh
    )  # an uneven split: 250 per device
    out["is_shards"] = [list(s.data.shape) for s in tokens.addressable_shards]
    out["is_devices"] = sorted(s.device.id for s in tokens.addressable_shards)

    out["smc_twisted"] = _twisted_smc(mesh)
    data = arm.sample(jax.random.key(4), (512,))
    seen = []  # how the partitioner laid out the tokens the student's network received

    def logits_fn(table, tokens):
        jax.debug.inspect_array_sharding(
            tokens, callback=lambda s: seen.append((len(s.device_set), s.is_fully_replicated))
        )
        previous = jnp.concatenate(
            [jnp.full_like(tokens[..., :1], space.num_actions), tokens[..., :-1]], -1
        )
        return table[previous]

    table = jnp.zeros((space.num_actions + 1, space.num_actions))
    student = sp.ARM(logits_fn, space, params=table)
    fit = {"steps": 12, "key": key, "batch_size": 64, "log_every": 4, "progress": False}
    distill = {"steps": 6, "key": key, "num_samples": 256, "evaluate": None, "log_every": 2,
               "progress": False}  # fmt: skip
    trainings = {  # each a function of the mesh (None: one device)
        "fit_data": lambda m: train.fit(student, data=data, mesh=m, **fit),
        "fit_risk": lambda m: train.fit(student, target=_target(space), mesh=m, **fit),
        "distill_reverse_kl": lambda m: sp.distill(
            ebm, student, "reverse_kl", estimator="score_function", mesh=m, **distill
        ),
        "distill_forward_kl": lambda m: sp.distill(
            ebm, student, "forward_kl", mesh=m, **distill
        ),
    }  # fmt: skip
    for name, run in trainings.items():
        runs = []
        for m in (None, mesh):
            seen.clear()
            trained, history = run(m)
            runs.append((trained.params, history["loss"].tolist(), sorted(set(seen))))
        out[name] = {
            "loss": [r[1] for r in runs],
            "params_max_diff": float(jnp.max(jnp.abs(runs[0][0] - runs[1][0]))),
            "layouts": [r[2] for r in runs],
        }
    return out


def _twisted_smc(mesh) -> dict:
    """A bigram base under a regex: SMC with a learned twist, with a lattice twist, and the
    conditional-SMC bound, each ``[one device, mesh]``."""
    space = sp.SequenceSpace(4, 6, eos=True)
    lat = sp.Lattice.markov(space, 1)
    table = sp.ARM.from_table(lat, np.random.default_rng(1).standard_normal((lat.num_states, 5)))
    dfa = sp.Lattice.regex(space, "(?:0|1)*2(?:3|0)*", ["0", "1", "2", "3"])
    learned, _ = sp.fit_twist(table, dfa, jax.random.key(0), steps=50, progress=False)
    target, key = table.constrain(dfa), jax.random.key(6)
    runs = {"learned": dict(twist=learned), "lattice": dict(twist=target),
            "csmc": dict(upper_bound="csmc")}  # fmt: skip
    out = {}
    for name, options in runs.items():
        estimates = [sp.log_partition(target, "smc", table, 1024, key, mesh=m, **options)
                     for m in (None, mesh)]  # fmt: skip
        out[name] = [[e.log_z, e.eubo] for e in estimates]
    return out


def _target(space):
    logits = np.random.default_rng(5).standard_normal(space.num_sequences)
    return jax.nn.log_softmax(jnp.asarray(logits))


if __name__ == "__main__":
    json.dump(main(), sys.stdout)
