"""Bayesian inference of a tilt temperature with NUTS, checked in ArviZ (summary, LOO, compare).

Observed sequences come from ``p_β(y) ∝ p_ref(y) · exp(β · R(y))``: a bigram reference tilted
towards responses with many zeros (``R(y)`` = number of zeros). The sequence site is observed, so
NUTS samples only the continuous β; the likelihood is exact because log Z(β) is one dynamic
program, differentiable in β. The same model is run with the site written as the EBM and as its
exact ARM (``sp.to_arm``): the posteriors agree. LOO then prefers the right reward over a wrong one.

    python examples/bayesian_tilt.py [--quick] [--seed N]
"""

import argparse

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.infer import MCMC, NUTS, Predictive

import seqppl as sp


def count_reward(lattice, token):
    """``R(y)`` = occurrences of ``token``, as local rewards on ``lattice``."""
    table = jnp.zeros((lattice.num_states, lattice.space.num_actions)).at[:, token].set(1.0)
    return sp.EBM.from_table(lattice, table)


def tilt_model(reference, reward, num_data, y=None, form="ebm"):
    """``β ~ Normal(0, 2)``; ``y_i ~ reference.tilt(reward, β)`` (as an EBM or its exact ARM)."""
    beta = numpyro.sample("beta", dist.Normal(0.0, 2.0))
    target = reference.tilt(reward, scale=beta)
    site = target if form == "ebm" else sp.to_arm(target)
    with numpyro.plate("data", num_data):
        numpyro.sample("y", site, obs=y)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer data and draws")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    num_data, draws = (120, 100) if args.quick else (500, 1000)
    true_beta = 0.7

    space = sp.SequenceSpace(vocab_size=4, length=5, eos=True)
    bigram = sp.Lattice.markov(space, order=1)
    logits = jax.random.normal(jax.random.key(args.seed), (bigram.num_states, space.num_actions))
    reference = sp.ARM.from_table(bigram, logits)
    zeros, ones = count_reward(bigram, 0), count_reward(bigram, 1)
    truth = sp.to_arm(reference.tilt(zeros, scale=true_beta))
    y = truth.sample(jax.random.key(args.seed + 1), (num_data,))
    print(f"{num_data} observed sequences from the tilt with beta = {true_beta}")

    trees = {}
    for name, reward, form in [
        ("ebm", zeros, "ebm"),
        ("arm", zeros, "arm"),
        ("wrong", ones, "ebm"),
    ]:
        mcmc = MCMC(
            NUTS(tilt_model),
            num_warmup=draws,
            num_samples=draws,
            num_chains=2,
            chain_method="sequential",
            progress_bar=False,
        )
        mcmc.run(jax.random.key(args.seed + 2), reference, reward, num_data, y, form)
        trees[name] = az.from_numpyro(mcmc, log_likelihood=True)
        if name != "wrong":
            print(f"\nposterior of beta, site written as {form.upper()}:")
            print(az.summary(trees[name], var_names=["beta"]).to_string())

    samples = {"beta": jnp.asarray(trees["ebm"]["posterior"]["beta"].values.reshape(-1))}
    predicted = Predictive(tilt_model, samples)(
        jax.random.key(args.seed + 3), reference, zeros, num_data
    )["y"]
    print(
        f"\nposterior predictive zeros per sequence: {float((predicted == 0).sum(-1).mean()):.3f} "
        f"(observed {float((y == 0).sum(-1).mean()):.3f})"
    )

    loo = az.loo(trees["ebm"])
    print(
        f"\nLOO (EBM site): elpd = {loo.elpd:.2f} ± {loo.se:.2f}, "
        f"max Pareto k = {float(np.max(loo.pareto_k)):.2f}"
    )
    print("\nmodel comparison (right reward as EBM and ARM, wrong reward):")
    print(az.compare(trees).to_string())


if __name__ == "__main__":
    main()
