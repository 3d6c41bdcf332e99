import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import seqppl as sp

from . import oracles
from .strategies import automata, lattices, prompts, spaces


def _paths(space):
    return oracles.all_sequences(space.vocab_size, space.length, space.eos)


@given(spaces(), st.integers(0, 3), st.data())
def test_markov_states_are_the_last_k_tokens(space, order, data):
    lat = sp.Lattice.markov(space, order=order)
    prompt = data.draw(prompts(space))
    seqs = _paths(space)
    states = np.asarray(lat.states(seqs, prompt=prompt))
    context0 = [] if prompt is None else list(prompt)
    for y, row in zip(seqs, states, strict=True):
        tau = oracles.response_length(y, space.eos_id)
        for t in range(tau):
            expected = oracles.markov_state(context0 + list(y[:t]), space.vocab_size, order)
            assert row[t] == expected
    assert lat.num_states == (space.vocab_size + 1) ** order


@given(spaces(), st.data())
def test_prefix_tree_states_are_prefixes(space, data):
    lat = sp.Lattice.prefix_tree(space)
    prompt = data.draw(prompts(space))
    seqs = _paths(space)
    states = np.asarray(lat.states(seqs, prompt=prompt))
    for y, row in zip(seqs, states, strict=True):
        for t in range(oracles.response_length(y, space.eos_id)):
            assert row[t] == oracles.prefix_state(y[:t], space.vocab_size)
    assert lat.num_states == sum(space.vocab_size**d for d in range(space.horizon))


@given(spaces(), st.data())
def test_automaton_and_product_states_follow_delta(space, data):
    lat = data.draw(lattices(space))
    prompt = data.draw(prompts(space))
    seqs = _paths(space)
    states = np.asarray(lat.states(seqs, prompt=prompt))
    start = oracles.prompt_start(lat, prompt)
    for y, row in zip(seqs, states, strict=True):
        tau = oracles.response_length(y, space.eos_id)
        assert list(row[:tau]) == oracles.walk(lat.delta, start, y[:tau])
    if lat.kind == "product":
        a, b = lat.factors
        pair_states = np.asarray(a.states(seqs, prompt)) * b.num_states + np.asarray(
            b.states(seqs, prompt)
        )
        np.testing.assert_array_equal(states, pair_states)


@given(spaces(), st.integers(0, 3), st.integers(0, 2), st.data())
def test_markov_states_read_off_the_context_equal_running_delta(space, order, other, data):
    """A Markov lattice (and a product of two) computes its states from the last k tokens with
    no scan: equal to running the same δ from the same start at every position, after EOS
    included (where the state stays put)."""
    prompt = data.draw(prompts(space))
    seqs = _paths(space)
    for lat in (
        sp.Lattice.markov(space, order),
        sp.Lattice.markov(space, order).product(sp.Lattice.markov(space, other)),
    ):
        assert lat.reads_context
        walked = sp.Lattice.automaton(space, lat.delta, lat.initial)  # the same δ, scanned
        assert not walked.reads_context
        np.testing.assert_array_equal(lat.states(seqs, prompt), walked.states(seqs, prompt))


def test_states_batch_prompts_and_jit():
    space = sp.SequenceSpace(vocab_size=3, length=2, eos=True)
    lat = sp.Lattice.markov(space, order=2)
    tokens = np.array([[0, 1, 3], [2, 3, 3]])
    prompts_ = np.array([[1, 2], [0, 0]])
    batched = lat.states(tokens, prompt=prompts_)
    for i in range(2):
        np.testing.assert_array_equal(batched[i], lat.states(tokens[i], prompt=prompts_[i]))
    jitted = jax.jit(lambda y, x: lat.states(y, prompt=x))(tokens, prompts_)
    np.testing.assert_array_equal(jitted, batched)
    assert lat.initial_state(prompts_).shape == (2,)


def test_lift_and_accepting_rewards():
    space = sp.SequenceSpace(vocab_size=2, length=3)
    parity = sp.Lattice.automaton(space, np.array([[0, 1], [1, 0]]), initial=0)
    bigram = sp.Lattice.markov(space, order=1)
    prod = bigram.product(parity)
    table = jnp.arange(6.0).reshape(3, 2)
    lifted = prod.lift(table, 0)
    assert lifted.shape == (6, 2)
    np.testing.assert_array_equal(lifted[::2], table)
    np.testing.assert_array_equal(lifted[1::2], table)
    accept = parity.accepting_rewards([0])
    assert accept.shape == (3, 2, 2)
    assert (accept[:2] == 0).all()
    # last decision: from parity 0 token 1 leads to parity 1 (rejected)
    np.testing.assert_array_equal(accept[2], [[0, -np.inf], [-np.inf, 0]])
    var = sp.SequenceSpace(vocab_size=2, length=3, eos=True)
    par_var = sp.Lattice.automaton(var, np.array([[0, 1], [1, 0]]))
    acc = par_var.accepting_rewards(np.array([True, False]))
    assert (
        (acc[:, 1, 2] == -np.inf).all() and (acc[:, 0, 2] == 0).all() and (acc[..., :2] == 0).all()
    )


def test_bad_lattice_input_is_refused():
    space = sp.SequenceSpace(vocab_size=2, length=3)
    with pytest.raises(ValueError, match="order must be an int >= 0"):
        sp.Lattice.markov(space, order=-1)
    with pytest.raises(ValueError, match=r"delta\[1, 0\] = 5 is not in \[0, 1\]"):
        sp.Lattice.automaton(space, np.array([[0, 1], [5, 0]]))
    with pytest.raises(ValueError, match="shape"):
        sp.Lattice.automaton(space, np.zeros((2, 3, 1), int))
    with pytest.raises(ValueError, match="integer"):
        sp.Lattice.automaton(space, np.zeros((2, 2)))
    with pytest.raises(ValueError, match="initial must be a state"):
        sp.Lattice.automaton(space, np.zeros((2, 2), int), initial=2)
    with pytest.raises(ValueError, match="MAX_PREFIX_TREE_CELLS"):
        sp.Lattice.prefix_tree(sp.SequenceSpace(vocab_size=10, length=9))
    with pytest.raises(ValueError, match="other lattice is over"):
        sp.Lattice.markov(space, 1).product(sp.Lattice.markov(sp.SequenceSpace(3, 3), 1))
    with pytest.raises(ValueError, match=r"prompt\[0\] = 2"):
        sp.Lattice.markov(space, 1).initial_state(np.array([2]))
    with pytest.raises(ValueError, match="product"):
        sp.Lattice.markov(space, 1).lift(jnp.zeros((3, 2)), 0)
    with pytest.raises(ValueError, match="accepting must hold states"):
        sp.Lattice.markov(space, 1).accepting_rewards([7])


@given(spaces(), st.data())
def test_delta_is_read_only_int32(space, data):
    lat = data.draw(automata(space))
    assert lat.delta.dtype == np.int32 and not lat.delta.flags.writeable
    assert lat.delta.shape == (lat.num_states, space.num_actions)


@given(spaces(), st.data())
def test_path_scores_sum_to_the_sequence_reward(space, data):
    from .strategies import tables

    lat = data.draw(lattices(space))
    r, _ = data.draw(tables(lat, np.float64))
    prompt = data.draw(prompts(space))
    seqs = _paths(space)
    scores = np.asarray(lat.path_scores(jnp.asarray(r), seqs, prompt))
    assert scores.shape == seqs.shape
    expected = [oracles.sequence_reward(r, lat, y, prompt) for y in seqs]
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(scores.sum(-1), expected, rtol=1e-12)
    bad = seqs.copy()
    bad[:, 0] = space.num_actions
    assert np.isneginf(np.asarray(lat.path_scores(jnp.asarray(r), bad, prompt)).sum(-1)).all()
