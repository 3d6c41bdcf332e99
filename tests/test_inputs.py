"""Quiet inputs refused at the door (issue 19): shapes and dtypes are errors (static, so also under
jit), values are refused where they are concrete, and every message names what was wrong."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from seqppl.models import paper
from seqppl.models.transformer import TransformerARM

import seqppl as sp
from seqppl import checks, estimate, loop

FIXED = sp.SequenceSpace(3, 3)  # T = 3
EOS = sp.SequenceSpace(3, 3, eos=True)  # T = 4: at most 3 tokens, then EOS


def _models(space):
    lat = sp.Lattice.markov(space, 1)
    zeros = jnp.zeros((lat.num_states, space.num_actions))
    return [
        sp.ARM.from_table(lat, zeros),
        sp.ARM(lambda y: jnp.zeros((*y.shape, space.num_actions)), space),
        sp.EBM.from_table(lat, zeros),
        sp.EBM(lambda y: jnp.zeros(y.shape[:-1]), space),
    ]


@pytest.mark.parametrize("space", [FIXED, EOS], ids=["fixed", "eos"])
def test_tokens_of_the_wrong_length_are_an_error_eagerly_and_under_jit(space):
    short = jnp.zeros((2, space.horizon - 1), jnp.int32)  # e.g. L tokens, EOS forgotten
    T = space.horizon
    message = rf"tokens must have last dimension T={T} \(.*\), got shape \(2, {T - 1}\)"
    for d in _models(space):
        with pytest.raises(ValueError, match=message):
            d.log_prob(short)
        with pytest.raises(ValueError, match=message):  # shapes are static: jit sees them
            jax.jit(d.log_prob)(short)
    with pytest.raises(ValueError, match=message):
        _models(space)[2].unnormalized_log_prob(short)


def test_float_tokens_are_a_type_error():
    y = jnp.array([0.5, 1.0, 2.0])
    for d in _models(FIXED):
        with pytest.raises(TypeError, match="tokens must have an integer dtype.*float"):
            d.log_prob(y)
    with pytest.raises(TypeError, match="tokens must have an integer dtype.*bool"):
        _models(FIXED)[0].log_prob(jnp.array([True, False, True]))


def test_nan_logits_of_a_callable_arm_are_refused_where_concrete():
    arm = sp.ARM(lambda y: jnp.full((*y.shape, 3), jnp.nan), FIXED)
    with pytest.raises(ValueError, match=r"logits_fn\(tokens\)\[0, 0\] = nan on the sequence"):
        arm.log_prob(jnp.array([0, 1, 2]))
    hot = sp.ARM(lambda y: jnp.zeros((*y.shape, 3)).at[..., 1].set(jnp.inf), FIXED)
    with pytest.raises(ValueError, match="never NaN or"):
        hot.log_prob(jnp.array([0, 1, 2]))
    # traced values are invisible to validation: documented (ARM.log_prob), NaN propagates
    assert np.isnan(jax.jit(arm.log_prob)(jnp.array([0, 1, 2])))


def test_logits_of_the_wrong_width_are_an_error_naming_both_widths():
    wide = sp.ARM(lambda y: jnp.zeros((*y.shape, 5)), EOS)
    message = r"logits_fn returned logits of shape \(4, 5\).* \[\.\.\., T=4, A=4\]"
    with pytest.raises(ValueError, match=message):
        wide.log_prob(jnp.array([0, 1, 3, 3]))
    with pytest.raises(ValueError, match=message):
        jax.jit(wide.log_prob)(jnp.array([0, 1, 3, 3]))
    with pytest.raises(ValueError, match="A=4"):
        wide.sample(jax.random.key(0))

    class Cached:  # init is right, the teacher-forcing call is too narrow: seen at construction
        def __call__(self, y):
            return jnp.zeros((*y.shape, 2))

        def init(self, batch_shape):
            return jnp.zeros((*batch_shape, 3)), jnp.zeros(batch_shape)

        def step(self, cache, token):
            return jnp.zeros((*token.shape, 3)), cache

    with pytest.raises(ValueError, match=r"logits_fn returned logits of shape \(3, 3, 2\)"):
        sp.ARM(Cached(), FIXED)


def test_transformer_arm_sample_refuses_prompt_plus_horizon_beyond_max_len():
    def transformer(max_len):
        rngs = nnx.Rngs(0)
        return TransformerARM(3, max_len, layers=1, heads=1, dim=4, mlp_dim=4, rngs=rngs)

    prompt = jnp.array([0, 1])  # P + T = 5 positions are needed
    with (
        jax.numpy_rank_promotion("allow"),
        pytest.raises(ValueError, match="5 positions exceed max_len=4"),
    ):
        sp.ARM.from_nnx(transformer(4), FIXED, prompt).sample(jax.random.key(0))
    with jax.numpy_rank_promotion("allow"):  # the model zoo's broadcasting, as in test_models
        arm = sp.ARM.from_nnx(transformer(5), FIXED, prompt)
        assert arm.sample(jax.random.key(0), (2,)).shape == (2, 3)


def test_an_overflowing_table_is_refused_where_concrete():
    lat = sp.Lattice.markov(FIXED, 1)
    big = jnp.full((lat.num_states, 3), 1e308)  # finite entries; a path of 3 sums to +∞
    with pytest.raises(ValueError, match=r"log Z = inf.*overflow"):
        sp.EBM.from_table(lat, big).log_partition()
    tempered = sp.EBM.from_table(lat, jnp.ones((lat.num_states, 3))).tempered(jnp.inf)
    with pytest.raises(ValueError, match=r"log Z = inf"):
        tempered.log_prob(jnp.array([0, 1, 2]))
    # under tracing (jit, grad, NUTS) the value is invisible: documented in EBM.log_prob
    traced = jax.jit(lambda beta: sp.EBM.from_table(lat, beta * big).log_prob(jnp.array([0, 1, 2])))
    assert not np.isfinite(traced(1.0)) and np.isfinite(traced(1e-300))


def _nan_after_2(y):  # causal: NaN logits once a 2 has been drawn
    previous = jnp.concatenate([jnp.zeros_like(y[..., :1]), y[..., :-1]], -1)
    return jnp.where((previous == 2)[..., None], jnp.nan, jnp.zeros((*y.shape, 3)))


@pytest.mark.parametrize("culprit", ["proposal", "reward", "twist"])
def test_smc_names_the_part_that_gave_a_nan_weight(monkeypatch, culprit):
    monkeypatch.setattr(estimate, "SMALL_SPACE", 0)  # skip the eager support check: SMC's own
    ebm = sp.EBM(lambda y: jnp.zeros(y.shape[:-1]), FIXED)
    proposal = sp.ARM.from_table(sp.Lattice.markov(FIXED, 0), jnp.zeros((1, 3)))
    twist = None
    if culprit == "proposal":
        proposal = sp.ARM(_nan_after_2, FIXED)
    elif culprit == "reward":
        ebm = sp.EBM(lambda y: jnp.where(y[..., 0] == 1, jnp.nan, 0.0), FIXED)
    else:
        twist = lambda y: jnp.where(y == 1, jnp.nan, 0.0)  # noqa: E731
    with pytest.raises(ValueError, match=r"an SMC weight is NaN: .* on the sequence \[") as error:
        sp.log_partition(
            ebm,
            "smc",
            proposal,
            16,
            jax.random.key(0),
            twist=twist,
            num_replicates=2,
            target_samples=None,
        )
    assert culprit in str(error.value) and ("twist" in str(error.value)) == (twist is not None)


def test_nan_reward_message_names_the_sequence_not_an_empty_index():
    with pytest.raises(ValueError) as error:
        checks.refuse_invalid(np.float64(np.nan), "the EBM's reward", rows=np.array([0, 1, 2]))
    assert "[]" not in str(error.value) and "on the sequence [0, 1, 2]" in str(error.value)
    with pytest.raises(ValueError, match=r"^the scalar = nan: "):
        checks.refuse_invalid(np.float64(np.nan), "the scalar")
    rows = np.array([[0, 0, 0], [1, 2, 0]])  # logits [N, T, A] of the sequences [N, T]
    logits = np.zeros((2, 3, 3))
    logits[1, 2, 0] = np.inf
    with pytest.raises(ValueError, match=r"q\[2, 0\] = inf on the sequence \[1, 2, 0\]"):
        checks.refuse_invalid(logits, "q", rows=rows)


def test_a_ragged_prompt_is_a_value_error_naming_prompt():
    lat = sp.Lattice.markov(FIXED, 1)
    ragged = [[0, 1], [0]]
    for build in (
        lambda: sp.ARM.from_table(lat, jnp.zeros((lat.num_states, 3)), prompt=ragged),
        lambda: sp.EBM(lambda y: jnp.zeros(y.shape[:-1]), FIXED, prompt=ragged),
    ):
        with pytest.raises(ValueError, match="prompt must be a rectangular array.*ragged"):
            build()
    with pytest.raises(ValueError, match="tokens must be a rectangular array"):
        _models(FIXED)[0].log_prob([[0, 1, 2], [0, 1]])


def test_a_nan_learning_rate_is_refused():
    # fit, distill and reproduce were fixed with issue 17 (checks.check_number); the schedule
    # they build, public as seqppl.loop.trapezoid_schedule, took a NaN peak until issue 19
    arm = sp.ARM.from_table(sp.Lattice.markov(FIXED, 0), jnp.zeros((1, 3)))
    data = jnp.array([[0, 1, 2]])
    with pytest.raises(ValueError, match="learning_rate must be a number in"):
        sp.fit(arm, data, steps=1, key=jax.random.key(0), learning_rate=float("nan"))
    ebm = sp.EBM.from_table(sp.Lattice.markov(FIXED, 0), jnp.zeros((1, 3)))
    with pytest.raises(ValueError, match="learning_rate must be a number in"):
        sp.distill(ebm, arm, steps=1, key=jax.random.key(0), learning_rate=float("nan"))
    with pytest.raises(ValueError, match="lr must be a number in"):
        paper.reproduce(steps=1, lr=float("nan"))
    with pytest.raises(ValueError, match="peak must be a number in"):
        loop.trapezoid_schedule(float("nan"), 10)
