"""A Bayesian bigram language model: Flax NNX parameters with NumPyro priors, fit by SVI and NUTS.

``sp.nnx_arm("lm", NGram(...), space, prior=Normal(0, 1))`` turns every entry of the n-gram's
logits table into a NumPyro sample site (``random_nnx_module``). NUTS and SVI (an AutoNormal
guide) infer them from observed sequences; ArviZ summarises the posterior, computes LOO from the
pointwise log-likelihoods, and the posterior predictive log-likelihood of held-out sequences is
compared with the maximum-likelihood table and with the truth.

    python examples/bayesian_ngram.py [--quick] [--seed N]
"""

import argparse

import arviz as az
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal
from numpyro.infer.util import log_likelihood
from seqppl.models.ngram import NGram

import seqppl as sp


def bigram_model(module, space, y):
    """Logits table ~ Normal(0, 1) entry-wise; each row of ``y`` ~ the bigram ARM."""
    arm = sp.nnx_arm("lm", module, space, prior=dist.Normal(0.0, 1.0))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", arm, obs=y)


def heldout_log_lik(model_args, samples, test):
    """Posterior predictive ``log mean_s p(y_test | θ_s)``, summed over held-out sequences."""
    pointwise = log_likelihood(bigram_model, samples, *model_args[:2], test)["y"]  # [S, N]
    return float(jnp.sum(jax.scipy.special.logsumexp(pointwise, 0) - jnp.log(pointwise.shape[0])))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer data, draws and SVI steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    num_train, draws, svi_steps = (80, 200, 800) if args.quick else (300, 1000, 4000)
    with jax.numpy_rank_promotion("allow"):
        run(args.seed, num_train, draws, svi_steps)


def run(seed, num_train, draws, svi_steps):
    space = sp.SequenceSpace(vocab_size=3, length=4, eos=True)
    lattice = sp.Lattice.markov(space, 1)
    truth_table = 1.5 * jax.random.normal(jax.random.key(seed), (lattice.num_states, 4))
    truth = sp.ARM.from_table(lattice, truth_table)
    y = truth.sample(jax.random.key(seed + 1), (num_train + 500,))
    train, test = y[:num_train], y[num_train:]
    module = NGram(space, order=1, rngs=nnx.Rngs(seed))
    print(f"{num_train} training and 500 held-out sequences from a random bigram (A = 4, T = 5)")

    mcmc = MCMC(
        NUTS(bigram_model),
        num_warmup=draws,
        num_samples=draws,
        num_chains=2,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.key(seed + 2), module, space, train)
    tree = az.from_numpyro(mcmc, log_likelihood=True)
    summary = az.summary(tree)
    print(
        f"\nNUTS: {len(summary)} table entries, max r_hat {summary['r_hat'].max():.3f}, "
        f"min ess_bulk {summary['ess_bulk'].min():.0f}"
    )
    loo = az.loo(tree)
    print(f"LOO: elpd = {loo.elpd:.2f} ± {loo.se:.2f}, max Pareto k = {np.max(loo.pareto_k):.2f}")

    guide = AutoNormal(bigram_model)
    svi = SVI(bigram_model, guide, numpyro.optim.Adam(0.02), Trace_ELBO())
    result = svi.run(jax.random.key(seed + 3), svi_steps, module, space, train, progress_bar=False)
    svi_samples = Predictive(guide, params=result.params, num_samples=2 * draws)(
        jax.random.key(seed + 4), module, space, train
    )
    nuts_samples = mcmc.get_samples()
    gap = float(
        jnp.max(jnp.abs(svi_samples["lm.table"].mean(0) - nuts_samples["lm.table"].mean(0)))
    )
    print(f"SVI (AutoNormal, {svi_steps} steps): max |posterior mean SVI - NUTS| = {gap:.3f}")

    start = sp.ARM.from_table(lattice, jnp.zeros_like(truth_table))
    mle, _ = sp.fit(
        start,
        train,
        steps=500,
        key=jax.random.key(seed + 5),
        learning_rate=0.1,
        batch_size=num_train,
        progress=False,
    )
    model_args = (module, space)
    scores = {
        "NUTS posterior predictive": heldout_log_lik(model_args, nuts_samples, test),
        "SVI posterior predictive": heldout_log_lik(model_args, svi_samples, test),
        "maximum likelihood (sp.fit)": float(mle.log_prob(test).sum()),
        "true bigram": float(truth.log_prob(test).sum()),
    }
    print("\nheld-out log-likelihood of 500 sequences:")
    for name, value in scores.items():
        print(f"  {name:28s} {value:9.2f}")


if __name__ == "__main__":
    main()
