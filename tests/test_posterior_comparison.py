"""compare_posteriors: the exact ARM at the site changes nothing; a poor student shifts the
posterior and loses in LOO."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import seqppl as sp

SPACE = sp.SequenceSpace(3, 3, eos=True)
BIGRAM = sp.Lattice.markov(SPACE, 1)
REFERENCE = sp.ARM.from_table(
    BIGRAM, jax.random.normal(jax.random.key(0), (BIGRAM.num_states, SPACE.num_actions))
)
ZEROS = sp.EBM.from_table(
    BIGRAM, jnp.zeros((BIGRAM.num_states, SPACE.num_actions)).at[:, 0].set(1.0)
)


def tilt_model(y=None, n=100):
    """β ~ Normal(0, 2); y_i ~ reference tilted by β · (number of zeros)."""
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.0))
    with numpyro.plate("data", n):
        numpyro.sample("y", REFERENCE.tilt(ZEROS, scale=beta), obs=y)


@pytest.fixture(scope="module")
def data():
    truth = sp.to_arm(REFERENCE.tilt(ZEROS, scale=0.7))
    return {"y": truth.sample(jax.random.key(1), (100,))}


def _compare(data, approx):
    return sp.compare_posteriors(
        tilt_model,
        data,
        site="y",
        approx=approx,
        key=jax.random.key(2),
        num_warmup=150,
        num_samples=150,
    )


def test_exact_arm_at_the_site_changes_nothing(data):
    result = _compare(data, sp.to_arm)
    assert result.max_abs_shift < 0.2
    assert result.parameters.loc["beta", "overlap"] > 0.9
    assert abs(result.loo.loc["approx", "elpd_diff"]) < 1e-6
    assert "beta" in str(result)


def test_a_poor_student_shifts_the_posterior_and_loses_in_loo(data):
    result = _compare(data, lambda ebm: sp.to_arm(ebm.tempered(0.5)))
    row = result.parameters.loc["beta"]
    assert abs(row["shift_sd"]) > 1 and abs(row["shift_sd"]) > 4 * row["mcse_shift"]
    assert row["overlap"] < 0.6
    loo = result.loo.loc["approx"]
    assert loo["elpd_diff"] < -2 * loo["dse"]


def test_bad_input(data):
    with pytest.raises(ValueError, match="not a sample site"):
        _compare_site(data, "z")
    with pytest.raises(ValueError, match="must be observed"):
        _compare_site(data, "beta")
    with pytest.raises(TypeError, match="not a Distribution"):
        _compare(data, lambda ebm: 3)
    with pytest.raises(TypeError, match="data must be a dict"):
        sp.compare_posteriors(tilt_model, [1], site="y", approx=REFERENCE, key=jax.random.key(0))


def _compare_site(data, site):
    return sp.compare_posteriors(
        tilt_model,
        data,
        site=site,
        approx=REFERENCE,
        key=jax.random.key(0),
        num_warmup=5,
        num_samples=5,
    )


def test_replace_site_keeps_plates_and_masks():
    from numpyro import handlers

    from seqppl.posterior_comparison import replace_site

    def masked_model(y=None):
        with numpyro.plate("data", 4):
            numpyro.sample(
                "y", REFERENCE.tilt(ZEROS, scale=0.3).mask(jnp.array([1, 1, 0, 0]) > 0), obs=y
            )

    y = REFERENCE.sample(jax.random.key(0), (4,))
    trace = handlers.trace(replace_site(masked_model, "y", sp.to_arm)).get_trace(y=y)
    log_prob = trace["y"]["fn"].log_prob(y)
    exact = sp.to_arm(REFERENCE.tilt(ZEROS, scale=0.3)).log_prob(y)
    np.testing.assert_allclose(log_prob, jnp.where(jnp.arange(4) < 2, exact, 0.0), rtol=1e-6)
