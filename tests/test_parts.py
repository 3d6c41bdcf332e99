"""The distributions layer's structure: typed EBM parts, one exact route, validation once at the
public door, the cached-step protocol checked when an ARM is built."""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import contextmanager

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from seqppl.models.tasks import digit_sum_task

import seqppl as sp
from seqppl import bellman, checks
from seqppl.distributions import parts

SPACE = sp.SequenceSpace(3, 3, eos=True)
LAT = sp.Lattice.markov(SPACE, 1)
RNG = np.random.default_rng(0)
R = RNG.standard_normal((LAT.num_states, SPACE.num_actions))
Q = RNG.standard_normal((SPACE.horizon, LAT.num_states, SPACE.num_actions))
PROMPT = np.array([1, 2])


@contextmanager
def counting(*targets):
    """Counts calls of functions (``(owner, name)``: patched in every seqppl module that holds
    the same object, since ``from m import f`` copies the reference) and methods."""
    counts = Counter()
    undo = []
    for owner, name in targets:
        original = getattr(owner, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            counts[_name] += 1
            return _original(*args, **kwargs)

        holders = [owner] if isinstance(owner, type) else []
        holders += [
            module
            for module_name, module in list(sys.modules.items())
            if module_name.startswith("seqppl") and module is not None
            for value in vars(module).values()
            if value is original
        ]
        for holder in dict.fromkeys(holders):
            for attr, value in list(vars(holder).items()):
                if value is original:
                    setattr(holder, attr, spy)
                    undo.append((holder, attr, original))
    try:
        yield counts
    finally:
        for holder, attr, original in undo:
            setattr(holder, attr, original)


VALIDATORS = [
    (checks, "first_invalid"),  # the host NaN/+∞ scan
    (sp.SequenceSpace, "validate_prompt"),
    (bellman, "soft_bellman"),  # M
    (bellman, "inverse_soft_bellman"),  # M⁻¹
]


def test_validation_happens_once_at_the_public_door():
    """Measured before the redesign: ebm.sample ×3 built M 3 times with 6 NaN scans and 9 prompt
    validations; to_ebm and to_arm each scanned twice and validated the prompt twice."""
    with counting(*VALIDATORS) as counts:
        ebm = sp.EBM.from_table(LAT, R, PROMPT)
        arm = sp.ARM.from_table(LAT, Q, PROMPT)
    assert counts == {"first_invalid": 2, "validate_prompt": 2}  # one table and prompt each
    with counting(*VALIDATORS) as counts:
        for seed in range(3):
            ebm.sample(jax.random.key(seed), (4,))
    assert counts == {"soft_bellman": 1}  # M built once per EBM, nothing validated again
    with counting(*VALIDATORS) as counts:
        twin = sp.to_ebm(arm)
    assert counts == {"inverse_soft_bellman": 1}
    with counting(*VALIDATORS) as counts:
        sp.to_arm(ebm)  # M is cached from the draws above
        sp.to_arm(twin)
    assert counts == {"soft_bellman": 1}
    with counting(*VALIDATORS) as counts:
        tilted = arm.tilt(ebm, scale=0.5)
        tilted.log_partition()
    assert counts == {"first_invalid": 1}  # log Z itself ([*batch]: an overflow), no table
    with counting(*VALIDATORS) as counts:
        sp.SequenceSpace.validate_prompt(SPACE, [0, 1])
    assert counts == {"validate_prompt": 1}, "the spy itself must see calls"


def test_every_part_answers_for_itself():
    task = digit_sum_task(SPACE, modulus=3)
    bigram = sp.ARM.from_table(sp.Lattice.markov(SPACE, 1), task.bigram_logits)
    callable_arm = sp.ARM(lambda y: jnp.zeros((*y.shape, SPACE.num_actions)), SPACE)
    ebm = (
        bigram.tilt(sp.EBM.from_table(LAT, R), scale=0.5).constrain(task.constraint, [0])
        * sp.EBM(lambda y: 0.1 * y.sum(-1), SPACE)
        * sp.to_ebm(callable_arm)
    )
    kinds = [type(p) for p in ebm.parts]
    assert kinds == [
        parts.ReferenceLogProb,
        parts.RewardTable,
        parts.Constraint,
        parts.RewardFunction,
        parts.PathRewards,
    ]
    y = jnp.asarray(SPACE.enumerate())
    total = sum(p.weighted_score(y, None, SPACE) for p in ebm.parts)
    np.testing.assert_array_equal(total, ebm.unnormalized_log_prob(y))
    assert ebm.parts[1].scale == 0.5 and ebm.parts[2].scaled(3.0) is ebm.parts[2]
    for part in ebm.parts:
        assert (part.lattice is None) == isinstance(part, parts.RewardFunction | parts.PathRewards)
        assert part.batch_shape == ()
        flat, treedef = jax.tree.flatten(part)
        assert type(jax.tree.unflatten(treedef, flat)) is type(part)


def test_one_exact_route_decides_every_exact_computation():
    route = sp.ExactRoute
    table = sp.EBM.from_table(LAT, R)
    assert table.exact_route is route.DYNAMIC_PROGRAM and table.is_lattice
    logits = jnp.sin(jnp.arange(4.0))
    callable_arm = sp.ARM(lambda y: jnp.broadcast_to(logits, (*y.shape, 4)), SPACE)
    path = sp.to_ebm(callable_arm)
    assert path.exact_route is route.ARM
    assert sp.to_arm(path) is callable_arm
    y = jnp.asarray(SPACE.enumerate())
    np.testing.assert_allclose(path.log_prob(y), callable_arm.log_prob(y), atol=1e-12)
    enumerable = sp.EBM(lambda y: -0.3 * y.sum(-1), SPACE)
    assert enumerable.exact_route is route.ENUMERATION
    big = sp.SequenceSpace(50, 20)
    none = sp.EBM(lambda y: jnp.zeros(y.shape[:-1]), big)
    assert none.exact_route is route.NONE and not none.exact_route.is_exact
    calls = (none.log_partition, lambda: none.sample(jax.random.key(0)), lambda: sp.to_arm(none))
    for call in calls:
        with pytest.raises(sp.NoExactRoute):
            call()
    assert issubclass(sp.NoExactARM, sp.NoExactRoute) and issubclass(sp.NoExactRoute, ValueError)


def test_a_tempered_path_ebm_is_not_its_arm():
    """Regression: to_ebm(callable ARM).tempered(β) returned the ARM's log Z for every β."""
    logits = jnp.log(jnp.array([0.7, 0.2, 0.1, 0.5]))
    callable_arm = sp.ARM(lambda y: jnp.broadcast_to(logits, (*y.shape, 4)), SPACE)
    tempered = sp.to_ebm(callable_arm).tempered(0.5)
    assert tempered.exact_route is sp.ExactRoute.ENUMERATION
    y = jnp.asarray(SPACE.enumerate())
    rewards = 0.5 * np.asarray(callable_arm.log_prob(y))  # + 0.5 V_q(x), a constant
    expected = rewards - np.log(np.sum(np.exp(rewards)))
    np.testing.assert_allclose(tempered.log_prob(y), expected, atol=1e-12)


def test_an_attached_log_z_survives_a_pytree_round_trip_and_the_report():
    """Regression: with_log_partition's estimate was an undeclared attribute, lost by jax.tree,
    and the distillation report then raised AttributeError."""
    ebm = sp.EBM(lambda y: -0.3 * y.sum(-1), SPACE)
    estimate = sp.log_partition(ebm, "exact")
    attached = ebm.with_log_partition(estimate)
    flat, treedef = jax.tree.flatten(attached)
    again = jax.tree.unflatten(treedef, flat)
    assert again.log_partition_source == "estimate"
    assert again.log_partition_estimate is estimate
    jitted = jax.jit(lambda e: e.log_partition())(attached)
    np.testing.assert_allclose(jitted, estimate.log_z)
    student = sp.ARM.from_table(sp.Lattice.markov(SPACE, 0), jnp.zeros((1, 4)))
    report = sp.distillation_error(again, student, "mc", key=jax.random.key(0), num_samples=64)
    assert "attached" in " ".join(report.notes)


def test_the_cached_step_protocol_is_checked_when_the_arm_is_built():
    def logits_fn(tokens):
        return jnp.zeros((*tokens.shape, SPACE.num_actions))

    logits_fn.init = lambda shape: (jnp.zeros((*shape, SPACE.num_actions)), jnp.zeros(shape))
    with pytest.raises(TypeError, match="has init but no step"):
        sp.ARM(logits_fn, SPACE)
    logits_fn.step = lambda cache, token: (jnp.zeros((*token.shape, 4)), cache)
    assert isinstance(sp.ARM(logits_fn, SPACE).source, sp.distributions.logits.CachedFunctionLogits)
    assert isinstance(logits_fn, sp.CachedLogits)

    def shared_cache(shape):  # a cache without the particle axis breaks SMC's resampling
        return jnp.zeros((*shape, SPACE.num_actions)), {"h": jnp.zeros((5,))}

    logits_fn.init = shared_cache
    with pytest.raises(TypeError, match=r"cache leaf \['h'\] of shape \(5,\)"):
        sp.ARM(logits_fn, SPACE)
