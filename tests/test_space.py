import numpy as np
import pytest
from hypothesis import given

import seqppl as sp

from . import oracles
from .strategies import spaces


@given(spaces())
def test_counts_and_enumeration_match_oracle(space):
    seqs = space.enumerate()
    expected = oracles.all_sequences(space.vocab_size, space.length, space.eos)
    assert seqs.shape == (space.num_sequences, space.horizon)
    assert {tuple(s) for s in seqs} == {tuple(s) for s in expected}
    assert len({tuple(s) for s in seqs}) == space.num_sequences
    space.validate(seqs)


def test_shapes_of_both_kinds():
    fixed = sp.SequenceSpace(vocab_size=3, length=4)
    assert (fixed.horizon, fixed.num_actions, fixed.eos_id, fixed.num_sequences) == (4, 3, None, 81)
    var = sp.SequenceSpace(vocab_size=3, length=4, eos=True)
    assert (var.horizon, var.num_actions, var.eos_id, var.num_sequences) == (5, 4, 3, 121)
    assert sp.SequenceSpace(1, 3, eos=True).num_sequences == 4
    mask = var.action_mask()
    assert mask[:-1].all() and mask[-1].tolist() == [False, False, False, True]


def test_enumerate_refuses_large_spaces():
    with pytest.raises(ValueError, match="more than max_sequences"):
        sp.SequenceSpace(vocab_size=50, length=10).enumerate()
    with pytest.raises(ValueError, match="max_sequences=10"):
        sp.SequenceSpace(vocab_size=2, length=4).enumerate(max_sequences=10)


@pytest.mark.parametrize(
    "tokens, message",
    [
        (np.array([[0.0, 1.0, 3.0]]), "integer dtype"),
        (np.array([[True, False, True]]), "integer dtype"),
        (np.array([0, 1]), "last dimension T=3"),
        (np.array([[0, 1, 3], [0, 5, 3]]), r"tokens\[1, 1\] = 5 is not in \[0, 3\]"),
        (np.array([[0, -1, 3]]), r"tokens\[0, 1\] = -1"),
        (np.array([[3, 1, 3]]), r"tokens\[0, 1\] = 1 follows EOS"),
        (np.array([[0, 1, 2]]), r"tokens\[0\] has no EOS by the horizon"),
    ],
)
def test_validate_names_the_problem_variable(tokens, message):
    space = sp.SequenceSpace(vocab_size=3, length=2, eos=True)
    with pytest.raises(ValueError, match=message):
        space.validate(tokens)


def test_validate_fixed_length_refuses_eos():
    space = sp.SequenceSpace(vocab_size=3, length=2)
    with pytest.raises(ValueError, match=r"tokens\[0, 1\] = 3 .*fixed-length space has no EOS"):
        space.validate(np.array([[0, 3]]))
    assert space.validate(np.array([[0, 2], [1, 1]])).shape == (2, 2)


def test_validate_prompt():
    space = sp.SequenceSpace(vocab_size=3, length=2, eos=True)
    assert space.validate_prompt(None) is None
    with pytest.raises(ValueError, match=r"prompt\[1\] = 3 .*no EOS"):
        space.validate_prompt(np.array([0, 3]))
    with pytest.raises(ValueError, match="integer dtype"):
        space.validate_prompt(np.array([0.5]))
    with pytest.raises(ValueError, match="scalar"):
        space.validate_prompt(np.array(1))


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"vocab_size": 0, "length": 2}, ValueError),
        ({"vocab_size": 2, "length": 0}, ValueError),
        ({"vocab_size": 2.0, "length": 2}, TypeError),
        ({"vocab_size": 2, "length": 2, "eos": "yes"}, TypeError),
    ],
)
def test_constructor_refuses_bad_sizes(kwargs, error):
    with pytest.raises(error, match="vocab_size|length|eos"):
        sp.SequenceSpace(**kwargs)
