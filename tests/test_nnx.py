"""Flax NNX modules as ARMs: ARM.from_nnx, nnx_arm with nnx_module / random_nnx_module."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from flax import nnx
from numpyro.infer import MCMC, NUTS, SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoDelta
from numpyro.infer.util import log_density

import seqppl as sp

from . import oracles

SPACE = sp.SequenceSpace(vocab_size=2, length=3, eos=True)  # A = 3, T = 4


class Bigram(nnx.Module):
    """Logits of y_t from y_{t-1} (BOS before the first token): an embedding of the previous id.

    Also implements the cached-step protocol when ``cached=True``.
    """

    def __init__(self, num_actions, *, rngs, cached=False):
        self.table = nnx.Param(jax.random.normal(rngs.params(), (num_actions + 1, num_actions)))
        self.bos = num_actions
        if cached:
            self.init = self._init
            self.step = self._step

    def __call__(self, tokens):
        bos = jnp.full(tokens.shape[:-1] + (1,), self.bos)
        previous = jnp.concatenate([bos, tokens[..., :-1]], axis=-1)
        return self.table[...][previous]

    def _init(self, batch_shape, prompt=None):
        return jnp.broadcast_to(self.table[...][self.bos], (*batch_shape, self.bos)), None

    def _step(self, cache, token):
        return self.table[...][token], cache


def test_from_nnx_matches_the_table_and_is_normalised():
    module = Bigram(SPACE.num_actions, rngs=nnx.Rngs(0))
    arm = sp.ARM.from_nnx(module, SPACE)
    seqs = jnp.asarray(SPACE.enumerate())
    log_p = arm.log_prob(seqs)
    assert abs(float(jax.scipy.special.logsumexp(log_p))) < 1e-6  # float32 module parameters
    table = np.asarray(module.table[...], np.float64)
    expected = [_bigram_log_prob(table, y) for y in oracles.all_sequences(2, 3, eos=True)]
    np.testing.assert_allclose(log_p, expected, rtol=1e-5, atol=1e-5)


def _bigram_log_prob(table, y):
    """Brute force: Σ_{t ≤ τ} log softmax(table[y_{t-1}])[y_t], only EOS at the last decision."""
    total, previous = 0.0, 3
    for t, token in enumerate(y):
        row = table[previous].copy()
        if t == len(y) - 1:
            row[:2] = -np.inf
        total += row[token] - oracles.logsumexp_np(row)
        if token == 2:
            return total
        previous = token
    return total


def test_from_nnx_params_are_pytree_data():
    module = Bigram(SPACE.num_actions, rngs=nnx.Rngs(0))
    arm = sp.ARM.from_nnx(module, SPACE)
    y = jnp.array([1, 0, 2, 2])
    jitted = jax.jit(lambda d, y: d.log_prob(y))
    np.testing.assert_allclose(jitted(arm, y), arm.log_prob(y), rtol=1e-6)
    zero = jax.tree.map(jnp.zeros_like, arm.params)
    uniform = arm.with_params(zero)
    # uniform logits: three choices for each of the two tokens and EOS, then the forced EOS
    np.testing.assert_allclose(jitted(uniform, y), 3 * np.log(1 / 3), rtol=1e-6)
    grads = jax.grad(lambda p: arm.with_params(p).log_prob(y))(arm.params)
    assert jax.tree.structure(grads) == jax.tree.structure(arm.params)
    assert float(jnp.abs(grads["table"]).sum()) > 0


def test_cached_module_samples_like_reevaluation():
    plain = sp.ARM.from_nnx(Bigram(SPACE.num_actions, rngs=nnx.Rngs(3)), SPACE)
    cached = sp.ARM.from_nnx(Bigram(SPACE.num_actions, rngs=nnx.Rngs(3), cached=True), SPACE)
    assert hasattr(cached.logits_fn, "step") and not hasattr(plain.logits_fn, "step")
    y_c, (lp_c,) = cached.sample_with_intermediates(jax.random.key(5), (50,))
    y_p, (lp_p,) = plain.sample_with_intermediates(jax.random.key(5), (50,))
    np.testing.assert_array_equal(y_c, y_p)
    np.testing.assert_allclose(lp_c, lp_p, rtol=1e-6)


def _data(n=400, seed=0):
    truth = sp.ARM.from_table(
        sp.Lattice.markov(SPACE, 1),
        jnp.asarray(np.random.default_rng(seed).standard_normal((3, 3))),
    )
    return truth, truth.sample(jax.random.key(seed), (n,))


def test_nnx_module_params_are_fit_by_svi_to_the_maximum_likelihood():
    truth, y = _data()
    module = Bigram(SPACE.num_actions, rngs=nnx.Rngs(0))

    def model(y):
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", sp.nnx_arm("lm", module, SPACE), obs=y)

    svi = SVI(model, AutoDelta(model), numpyro.optim.Adam(0.05), Trace_ELBO())
    result = svi.run(jax.random.key(0), 600, y, progress_bar=False)
    fitted = sp.ARM.from_nnx(module, SPACE, params=result.params["lm$params"])
    # MLE of a bigram = empirical transition frequencies; compare the mean log-likelihood
    # (the last decision is a forced EOS and positions after the first EOS are padding)
    y_np = np.asarray(y)
    prev = np.concatenate([np.full((len(y), 1), 3), y_np[:, :-1]], 1)
    free = (np.cumsum(y_np == 2, 1) - (y_np == 2) == 0) & (np.arange(4) < 3)
    counts = np.zeros((4, 3))
    np.add.at(counts, (prev[free], y_np[free]), 1)
    freq = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    mle = np.sum(counts * np.log(np.where(counts > 0, freq, 1))) / len(y)
    fitted_ll = float(fitted.log_prob(y).mean())
    assert mle - 0.01 < fitted_ll <= mle + 1e-6
    assert fitted_ll > float(truth.log_prob(y).mean()) - 1e-6  # at least the truth on its data


def test_random_nnx_module_parameters_are_nuts_sites():
    _, y = _data(n=60, seed=1)
    module = Bigram(SPACE.num_actions, rngs=nnx.Rngs(0))

    def model(y):
        arm = sp.nnx_arm("lm", module, SPACE, prior=dist.Normal(0.0, 2.0))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", arm, obs=y)

    mcmc = MCMC(NUTS(model), num_warmup=150, num_samples=150, progress_bar=False)
    mcmc.run(jax.random.key(0), y)
    samples = mcmc.get_samples()
    assert set(samples) == {"lm.table"} and samples["lm.table"].shape == (150, 4, 3)
    # the log density at a posterior draw equals prior + ARM.from_nnx likelihood at that draw
    draw = jax.tree.map(lambda s: s[-1], samples)
    joint, _ = log_density(model, (y,), {}, draw)
    arm = sp.ARM.from_nnx(module, SPACE, params={"table": draw["lm.table"]})
    prior = dist.Normal(0.0, 2.0).log_prob(draw["lm.table"]).sum()
    np.testing.assert_allclose(joint, prior + arm.log_prob(y).sum(), rtol=1e-6)
