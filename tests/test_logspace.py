import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import seqppl as sp
from seqppl.checks import first_invalid

from . import oracles
from .strategies import tolerance

NEG_INF = -np.inf


@st.composite
def rows(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    shape = (draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    scale = draw(st.sampled_from([1.0, 1e3, 1e30]))
    x = scale * rng.standard_normal(shape)
    x[rng.random(shape) < draw(st.sampled_from([0.0, 0.5, 1.0]))] = NEG_INF
    return x, scale


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@given(data=rows())
def test_logsumexp_matches_oracle_and_gradients_are_softmax(dtype, data):
    x, scale = data
    if dtype == np.float32 and scale > 1e30:
        scale = 1e30
    x = x.astype(dtype)
    out = sp.logsumexp(jnp.asarray(x), -1)
    assert out.dtype == dtype
    expected = oracles.logsumexp_np(x.astype(np.float64), axis=-1)
    assert np.array_equal(np.isneginf(out), np.isneginf(expected))
    finite = np.isfinite(expected)
    rel = np.abs(np.asarray(out, np.float64)[finite] - expected[finite]) / np.maximum(
        1.0, np.abs(expected[finite])
    )
    assert (rel <= 64 * np.finfo(dtype).eps).all()
    grad = jax.grad(lambda v: sp.logsumexp(v, -1).sum())(jnp.asarray(x))
    assert not np.isnan(grad).any()
    with np.errstate(invalid="ignore", over="ignore"):
        softmax = np.where(finite[:, None], np.exp(x.astype(np.float64) - expected[:, None]), 0.0)
    softmax = np.nan_to_num(softmax)
    np.testing.assert_allclose(grad, softmax, atol=tolerance(dtype, 1, 1.0))
    np.testing.assert_allclose(sp.softmax(jnp.asarray(x)), softmax, atol=tolerance(dtype, 1, 1.0))


def test_all_neg_inf_row_gives_neg_inf_and_zero_gradient():
    x = jnp.array([[NEG_INF, NEG_INF], [0.0, NEG_INF]])
    assert np.isneginf(sp.logsumexp(x, -1)[0])
    grad = jax.grad(lambda v: sp.logsumexp(v, -1).sum())(x)
    np.testing.assert_array_equal(grad, [[0.0, 0.0], [1.0, 0.0]])
    # jax's own reduction is NaN there: the reason this module exists
    assert np.isnan(jax.grad(lambda v: jax.nn.logsumexp(v, -1).sum())(x)).any()
    ls = sp.log_softmax(x, -1)
    assert np.isneginf(ls).tolist() == [[True, True], [False, True]]
    grad = jax.grad(
        lambda v: jnp.where(jnp.isfinite(sp.log_softmax(v)), sp.log_softmax(v), 0).sum()
    )(x)
    assert not np.isnan(grad).any()


def test_second_derivative_is_finite_on_masked_rows():
    x = jnp.array([0.3, NEG_INF, -1.0])
    hess = jax.hessian(lambda v: sp.logsumexp(v, -1))(x)
    assert not np.isnan(hess).any()
    p = np.exp(np.array([0.3, -1.0]) - oracles.logsumexp_np([0.3, -1.0]))
    np.testing.assert_allclose(hess[np.ix_([0, 2], [0, 2])], np.diag(p) - np.outer(p, p), atol=1e-6)


def test_reduces_any_axis():
    x = np.arange(6.0).reshape(2, 3)
    expected = oracles.logsumexp_np(x, axis=0)
    np.testing.assert_allclose(sp.logsumexp(jnp.asarray(x), 0), expected, rtol=1e-12)
    np.testing.assert_allclose(sp.log_softmax(jnp.asarray(x), 0), x - expected[None], rtol=1e-12)


def test_nan_and_pos_inf_propagate_instead_of_hiding():
    out = sp.logsumexp(jnp.array([[np.nan, 0.0], [np.inf, 0.0]]), -1)
    assert np.isnan(out[0]) and out[1] == np.inf


@given(st.integers(0, 11), st.sampled_from([np.nan, np.inf]))
def test_first_invalid_finds_the_bad_entry_and_accepts_neg_inf(position, bad):
    x = np.zeros((3, 4))
    x[0, 0] = -np.inf
    assert first_invalid(x) is None
    if position != 0:
        x.flat[position] = bad
        assert first_invalid(jnp.asarray(x)) == np.unravel_index(position, x.shape)
    seen = []
    jax.jit(lambda a: seen.append(first_invalid(a)) or a)(jnp.asarray(x))
    assert seen == [None]  # traced values are not inspected
