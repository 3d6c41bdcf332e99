"""Hypothesis strategies: tiny spaces, lattices of every kind, tables with −∞ masks and big values.

Also the one tolerance helper of the suite.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import seqppl as sp

MAX_SEQUENCES = 400


def tolerance(dtype, horizon: int, scale: float) -> float:
    """Absolute tolerance for log-space results: 64 · eps(dtype) · T · max(1, scale)."""
    return 64 * float(np.finfo(dtype).eps) * horizon * max(1.0, scale)


def assert_close(actual, expected, tol: float, what: str = "") -> None:
    """Same −∞ pattern, finite entries within ``tol``; no NaN on either side."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert not np.isnan(actual).any(), f"{what}: NaN in result"
    assert np.array_equal(np.isneginf(actual), np.isneginf(expected)), (
        f"{what}: −∞ pattern differs\n{actual}\n{expected}"
    )
    finite = np.isfinite(expected)
    err = np.max(np.abs(actual[finite] - expected[finite]), initial=0.0)
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}"


@st.composite
def spaces(draw, max_sequences: int = MAX_SEQUENCES):
    eos = draw(st.booleans())
    vocab_size = draw(st.integers(1, 4))
    length = draw(st.integers(1, 5))
    space = sp.SequenceSpace(vocab_size, length, eos=eos)
    while space.num_sequences > max_sequences:
        length -= 1
        space = sp.SequenceSpace(vocab_size, length, eos=eos)
    return space


@st.composite
def automata(draw, space, max_states: int = 4):
    num_states = draw(st.integers(1, max_states))
    delta = draw(
        st.lists(
            st.integers(0, num_states - 1),
            min_size=num_states * space.vocab_size,
            max_size=num_states * space.vocab_size,
        )
    )
    delta = np.array(delta).reshape(num_states, space.vocab_size)
    return sp.Lattice.automaton(space, delta, draw(st.integers(0, num_states - 1)))


@st.composite
def lattices(draw, space):
    kind = draw(st.sampled_from(["prefix_tree", "markov", "automaton", "product"]))
    if kind == "prefix_tree":
        return sp.Lattice.prefix_tree(space)
    if kind == "markov":
        return sp.Lattice.markov(space, order=draw(st.integers(0, 3)))
    if kind == "automaton":
        return draw(automata(space))
    left = sp.Lattice.markov(space, order=draw(st.integers(0, 1)))
    return left.product(draw(automata(space, max_states=3)))


@st.composite
def prompts(draw, space):
    if draw(st.booleans()):
        return None
    n = draw(st.integers(0, 3))
    ids = draw(st.lists(st.integers(0, space.vocab_size - 1), min_size=n, max_size=n))
    return np.array(ids, dtype=np.int64)


@st.composite
def tables(draw, lat, dtype, neg_inf: bool = True, homogeneous=None):
    """Local rewards: normal draws times a scale in {1, 10, 1e3}, some entries −∞."""
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    scale = draw(st.sampled_from([1.0, 10.0, 1e3]))
    if homogeneous is None:
        homogeneous = draw(st.booleans())
    shape = (lat.num_states, lat.space.num_actions)
    if not homogeneous:
        shape = (lat.space.horizon, *shape)
    table = scale * rng.standard_normal(shape)
    if neg_inf:
        p = draw(st.sampled_from([0.0, 0.2, 0.5]))
        table[rng.random(shape) < p] = -np.inf
    return table.astype(dtype), scale


@st.composite
def problems(draw, dtype=None, neg_inf: bool = True):
    """(lattice, rewards table, prompt, dtype, scale)."""
    space = draw(spaces())
    lat = draw(lattices(space))
    dtype = dtype or draw(st.sampled_from([np.float32, np.float64]))
    table, scale = draw(tables(lat, dtype, neg_inf))
    return lat, table, draw(prompts(space)), dtype, scale


@st.composite
def arm_tables(draw, lat, dtype):
    """Valid ARM logits [T, S, A]: every state keeps at least one finite allowed logit."""
    table, scale = draw(tables(lat, dtype, homogeneous=False))
    space = lat.space
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    T, S, A = table.shape
    keep = rng.integers(0, A, size=(T, S))
    if space.eos:
        keep[-1] = space.eos_id
    idx = (np.arange(T)[:, None], np.arange(S)[None, :], keep)
    table[idx] = np.where(np.isneginf(table[idx]), 0.0, table[idx])
    return table, scale
