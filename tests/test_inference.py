"""NumPyro inference with sequence sites: NUTS over a tilt temperature, Predictive, ArviZ LOO.

The model: ``β ~ Normal(0, 2)``, ``y_i ~ p_β ∝ p_base · exp(β · #zeros(y))`` i.i.d., with the
site written as the EBM (``base.tilt(...)``) or as its exact ARM (``to_arm``). Both forms are
checked against the exact posterior of β on a fine grid (the likelihood is exact by DP).
"""

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer import MCMC, NUTS, Predictive

import seqppl as sp

SPACE = sp.SequenceSpace(vocab_size=3, length=4, eos=True)
LAT = sp.Lattice.markov(SPACE, 1)
BASE = sp.ARM.from_table(
    LAT, jnp.asarray(np.random.default_rng(0).standard_normal((LAT.num_states, 4)))
)
TRUE_BETA, NUM_DATA, PRIOR_SD = 0.8, 200, 2.0


def count_reward(token):
    """Local reward 1 for each occurrence of ``token``: ``R(y) = #token(y)``."""
    return sp.EBM.from_table(LAT, jnp.zeros((LAT.num_states, 4)).at[:, token].set(1.0))


def model(num_data, y=None, form="ebm", token=0):
    beta = numpyro.sample("beta", dist.Normal(0.0, PRIOR_SD))
    target = BASE.tilt(count_reward(token), scale=beta)
    site = target if form == "ebm" else sp.to_arm(target)
    with numpyro.plate("data", num_data):
        numpyro.sample("y", site, obs=y)


def simulate(seed, beta=TRUE_BETA, n=NUM_DATA):
    return sp.to_arm(BASE.tilt(count_reward(0), scale=beta)).sample(jax.random.key(seed), (n,))


def run_nuts(y, form="ebm", token=0, seed=0, num_samples=400):
    mcmc = MCMC(
        NUTS(model),
        num_warmup=200,
        num_samples=num_samples,
        num_chains=2,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(seed), y.shape[0], y, form, token)
    return mcmc


def grid_posterior(y):
    """Exact posterior mean and sd of β by quadrature on a fine grid."""
    grid = jnp.linspace(-1.0, 3.0, 2001)

    def log_post(beta):
        like = BASE.tilt(count_reward(0), scale=beta).log_prob(y).sum()
        return like + dist.Normal(0.0, PRIOR_SD).log_prob(beta)

    lp = jax.vmap(log_post)(grid)
    w = np.exp(np.asarray(lp - lp.max()))
    w /= w.sum()
    mean = float(np.sum(w * grid))
    return mean, float(np.sqrt(np.sum(w * (np.asarray(grid) - mean) ** 2)))


@pytest.fixture(scope="module")
def fitted():
    y = simulate(seed=1)
    return y, {form: run_nuts(y, form) for form in ("ebm", "arm")}


def test_log_density_is_identical_for_both_site_forms():
    y = simulate(seed=2, n=20)
    for beta in (-1.3, 0.0, 0.8, 2.5):
        params = {"beta": jnp.asarray(beta)}
        ebm_ld, _ = numpyro.infer.util.log_density(model, (20, y, "ebm"), {}, params)
        arm_ld, _ = numpyro.infer.util.log_density(model, (20, y, "arm"), {}, params)
        np.testing.assert_allclose(ebm_ld, arm_ld, rtol=1e-10)


def test_nuts_matches_the_exact_posterior_whichever_form_the_site_takes(fitted):
    y, runs = fitted
    exact_mean, exact_sd = grid_posterior(y)
    assert abs(exact_mean - TRUE_BETA) < 4 * exact_sd  # the data identify β
    means = {}
    for form, mcmc in runs.items():
        summary = az.summary(az.from_numpyro(mcmc), var_names=["beta"])
        mean, sd = float(summary["mean"].iloc[0]), float(summary["sd"].iloc[0])
        mcse, mcse_sd = float(summary["mcse_mean"].iloc[0]), float(summary["mcse_sd"].iloc[0])
        assert float(summary["r_hat"].iloc[0]) < 1.02, form
        assert abs(mean - exact_mean) < 4 * mcse, (form, mean, exact_mean, mcse)
        assert abs(sd - exact_sd) < 4 * mcse_sd + 0.02 * exact_sd, (form, sd, exact_sd)
        means[form] = (mean, mcse)
    (m_a, s_a), (m_b, s_b) = means.values()
    assert abs(m_a - m_b) < 4 * np.hypot(s_a, s_b)


def test_predictive_draws_sequences_from_the_posterior(fitted):
    y, runs = fitted
    samples = runs["ebm"].get_samples()
    draws = Predictive(model, samples)(jax.random.key(3), 50)["y"]
    assert draws.shape == (800, 50, SPACE.horizon) and jnp.issubdtype(draws.dtype, jnp.integer)
    assert bool(sp.SequenceSupport(SPACE)(draws).all())
    # posterior predictive frequency of token 0 per sequence ≈ the data's (same model)
    observed = float((y == 0).sum(-1).mean())
    predicted = np.asarray((draws == 0).sum(-1).mean(-1))
    assert abs(predicted.mean() - observed) < 4 * predicted.std() + 0.05


def test_arviz_loo_and_compare_on_the_sequence_site(fitted):
    y, runs = fitted
    trees = {form: az.from_numpyro(mcmc, log_likelihood=True) for form, mcmc in runs.items()}
    trees["wrong_token"] = az.from_numpyro(run_nuts(y, token=1), log_likelihood=True)
    assert trees["ebm"]["log_likelihood"]["y"].shape == (2, 400, NUM_DATA)
    loo = {name: az.loo(tree) for name, tree in trees.items()}
    assert all(np.isfinite(r.elpd) for r in loo.values())
    assert float(np.max(loo["ebm"].pareto_k)) < 0.7
    assert abs(loo["ebm"].elpd - loo["arm"].elpd) < 4 * loo["ebm"].se / np.sqrt(NUM_DATA) + 0.5
    ranking = az.compare(trees)
    assert ranking.index[-1] == "wrong_token"  # the misspecified reward ranks last


@pytest.mark.slow
def test_simulation_study_recovers_beta_with_calibrated_intervals():
    """Over 20 data sets, the 90% central posterior interval covers the true β in ≥ 80%."""
    covered = []
    for seed in range(20):
        beta = float(np.random.default_rng(seed).uniform(-1.0, 2.0))
        samples = np.asarray(
            run_nuts(simulate(100 + seed, beta=beta), seed=seed).get_samples()["beta"]
        )
        low, high = np.quantile(samples, [0.05, 0.95])
        covered.append(low <= beta <= high)
    assert np.mean(covered) >= 0.8, covered
