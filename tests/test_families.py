"""One case table of every distribution family, NumPyro style (``test_dist_shape``,
``test_dist_pytree``): each family crossed with {eager, jit} and {no batch, a batch of two
prompts} for shapes, pytree round trips, support, normalisation, per-entry agreement with the
unbatched distribution, and entropy where it is exact.

All families live on one small space (V = 2, at most 2 tokens, EOS: T = 3, A = 3, 7
sequences) and read the prompt, so one set of compilations serves the whole table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import seqppl as sp

from . import oracles

SPACE = sp.SequenceSpace(2, 2, eos=True)
T, A = SPACE.horizon, SPACE.num_actions
LAT = sp.Lattice.markov(SPACE, 1)
RNG = np.random.default_rng(3)
Q = RNG.standard_normal((T, LAT.num_states, A))
R = RNG.standard_normal((LAT.num_states, A))
PARITY = sp.Lattice.automaton(SPACE, np.array([[0, 1], [1, 0]]))  # parity of the digit sum
EMBED = jnp.asarray(RNG.standard_normal((A + 1, A)))
PROMPTS = np.array([[0], [1]])  # the batch: two prompts


def _previous(tokens, prompt):
    """The token before each decision (``A`` = none), from the prompt's last token."""
    first = jnp.full(tokens.shape[:-1], A) if prompt is None else prompt[..., -1]
    batch = jnp.broadcast_shapes(tokens.shape[:-1], first.shape)
    tokens = jnp.broadcast_to(tokens, (*batch, tokens.shape[-1]))
    return jnp.concatenate([jnp.broadcast_to(first, batch)[..., None], tokens[..., :-1]], -1)


def bigram_fn(tokens, prompt=None):
    """A causal logits function reading the previous token (or the prompt's last)."""
    return EMBED[_previous(tokens, prompt)]


class CachedBigram:
    """``bigram_fn`` with the ``CachedLogits`` protocol: the cache is the previous token."""

    def __call__(self, tokens, prompt=None):
        return bigram_fn(tokens, prompt)

    def init(self, shape, prompt=None):
        first = jnp.full(shape, A) if prompt is None else jnp.broadcast_to(prompt[..., -1], shape)
        return EMBED[first], first

    def step(self, cache, token):
        return EMBED[token], token


class NNXBigram(nnx.Module):
    """The same bigram as a Flax NNX module (its table is the trainable parameter)."""

    def __init__(self):
        self.embed = nnx.Param(EMBED)

    def __call__(self, tokens, prompt=None):
        return self.embed[...][_previous(tokens, prompt)]


def _table_ebm(prompt):
    return sp.EBM.from_table(LAT, R, prompt)


FAMILIES = {
    "table ARM": lambda p: sp.ARM.from_table(LAT, Q, p),
    "callable ARM": lambda p: sp.ARM(bigram_fn, SPACE, p),
    "cached ARM": lambda p: sp.ARM(CachedBigram(), SPACE, p),
    "NNX ARM": lambda p: sp.ARM.from_nnx(NNXBigram(), SPACE, p),
    "table EBM": _table_ebm,
    "tilt": lambda p: sp.ARM.from_table(LAT, Q, p).tilt(
        lambda y, prompt=None: 0.4 * (y == 1).sum(-1), 0.7
    ),
    "product": lambda p: (
        _table_ebm(p) * sp.EBM(lambda y, prompt=None: -0.3 * (y == 0).sum(-1), SPACE, p)
    ),
    "constraint": lambda p: _table_ebm(p).constrain(PARITY, [0]),
    "tempered": lambda p: sp.to_ebm(sp.ARM(bigram_fn, SPACE, p)).tempered(0.5),
    "to_arm result": lambda p: sp.to_arm(_table_ebm(p)),
    "to_ebm result": lambda p: sp.to_ebm(sp.ARM.from_table(LAT, Q, p)),
}
EXACT_ENTROPY = {"table ARM", "to_arm result"}
MODES = {"eager": lambda f: f, "jit": jax.jit}


@pytest.mark.parametrize("batched", [False, True], ids=["no batch", "batch"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family(family, batched):
    prompt = PROMPTS if batched else None
    d = FAMILIES[family](prompt)
    batch = (2,) if batched else ()
    assert d.batch_shape == batch and d.event_shape == (T,)
    seqs = jnp.asarray(SPACE.enumerate())  # [7, T]
    grid = seqs.reshape(len(seqs), *(1,) * len(batch), T)
    for mode, wrap in MODES.items():
        log_prob = wrap(lambda d, y: d.log_prob(y))
        lp = np.asarray(log_prob(d, grid), np.float64)
        assert lp.shape == (len(seqs), *batch), mode
        assert not np.isnan(lp).any()
        np.testing.assert_allclose(
            [oracles.logsumexp_np(lp[(slice(None), *i)]) for i in np.ndindex(*batch)],
            0.0,
            atol=1e-10,
            err_msg=f"{family} ({mode}) is not normalised",
        )
        for shape in [(), (2, 3)]:
            y = wrap(lambda d, key, s=shape: d.sample(key, s))(d, jax.random.key(1))
            assert y.shape == (*shape, *batch, T), (mode, shape)
            assert bool(d.support(y).all()), (mode, shape)
            SPACE.validate(np.asarray(y))
            assert log_prob(d, y).shape == (*shape, *batch)
            assert np.isfinite(np.asarray(log_prob(d, y))).all(), "drew a sequence of mass 0"
        leaves, treedef = jax.tree.flatten(d)
        rebuilt = jax.tree.unflatten(treedef, leaves)
        np.testing.assert_array_equal(log_prob(rebuilt, grid), lp)
        through = jax.jit(lambda d: d)(d)  # a pytree through jit: data traced, aux kept
        assert type(through) is type(d) and through.batch_shape == batch
        np.testing.assert_allclose(np.asarray(through.log_prob(grid)), lp, atol=1e-12)
    if batched:  # every entry is the distribution of its own prompt
        for i, single_prompt in enumerate(PROMPTS):
            single = FAMILIES[family](single_prompt)
            np.testing.assert_allclose(lp[:, i], single.log_prob(seqs), atol=1e-10)
    if family in EXACT_ENTROPY:
        p = np.exp(lp)
        expected = -(p * np.where(p > 0, lp, 0)).sum(0)
        np.testing.assert_allclose(d.entropy(), expected, rtol=1e-10, atol=1e-12)
    elif isinstance(d, sp.ARM):
        with pytest.raises(ValueError, match="exact for table ARMs"):
            d.entropy()
