"""PRNG keys: every entry point that takes a key accepts NumPyro's legacy ``PRNGKey(n)`` and the
typed ``key(n)`` with the same results, and refuses anything else with one message."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqppl as sp

SPACE = sp.SequenceSpace(3, 3, eos=True)
BIGRAM = sp.Lattice.markov(SPACE, 1)
ARM = sp.ARM.from_table(
    BIGRAM, jax.random.normal(jax.random.key(0), (BIGRAM.num_states, SPACE.num_actions))
)
EBM = sp.EBM.from_table(BIGRAM, jnp.zeros((BIGRAM.num_states, SPACE.num_actions)).at[:, 0].set(1))
DATA = ARM.sample(jax.random.key(1), (16,))
REFUSED = re.escape("must be one PRNG key, jax.random.key(n) or jax.random.PRNGKey(n)")


def _quiet(fn):
    def run(key):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.EstimateWarning)  # few samples: judged elsewhere
            return fn(key)

    return run


ENTRY_POINTS = {
    "ARM.sample": lambda key: ARM.sample(key, (5,)),
    "EBM.sample": lambda key: EBM.sample(key, (5,)),
    "log_partition is": _quiet(lambda key: sp.log_partition(EBM, "is", ARM, 64, key).log_z),
    "log_partition smc": _quiet(
        lambda key: sp.log_partition(EBM, "smc", ARM, 64, key, num_replicates=2).log_z
    ),
    "distillation_error mc": lambda key: (
        sp.distillation_error(EBM, ARM, method="mc", num_samples=64, key=key).kl_reverse
    ),
    "fit": lambda key: sp.fit(ARM, DATA, steps=2, batch_size=4, key=key, progress=False)[1]["loss"],
    "distill": lambda key: sp.distill(
        EBM, ARM, steps=2, key=key, num_samples=8, evaluate=None, progress=False
    )[1]["loss"],
}


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
def test_legacy_and_typed_keys_give_the_same_result(name):
    """Regression: log_partition and distillation_error refused ``PRNGKey(n)``."""
    run = ENTRY_POINTS[name]
    legacy, typed = run(jax.random.PRNGKey(7)), run(jax.random.key(7))
    np.testing.assert_array_equal(np.asarray(legacy), np.asarray(typed))


@pytest.mark.parametrize("name", list(ENTRY_POINTS))
@pytest.mark.parametrize("bad", [0, np.float32(1.0), jnp.zeros(2, jnp.float32)])
def test_anything_else_is_refused_with_one_message(name, bad):
    """Regression: ``arm.sample(0)`` failed deep inside JAX's PRNG code."""
    with pytest.raises(TypeError, match=REFUSED):
        ENTRY_POINTS[name](bad)


def test_compare_posteriors_refuses_a_non_key_before_running_nuts():
    with pytest.raises(TypeError, match=REFUSED):
        sp.compare_posteriors(lambda y=None: None, {}, site="y", approx=sp.to_arm, key=3)
