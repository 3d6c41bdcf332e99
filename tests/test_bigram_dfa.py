"""models.bigram_dfa: the factored soft-Bellman pass of a counts bigram × a token DFA, against
the dense product (``base.constrain(dfa)`` of ``ngram_base(..., method="counts")``) and against
enumeration with Python's ``re.fullmatch`` on the detokenised text."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp
from seqppl.models.bigram_dfa import CountRows, bigram_counts, factored_dp
from seqppl.models.bpe import detokenize, ngram_base, ngram_counts, token_windows, train_tokenizer

import seqppl as sp

TEXT = "the cat sat on the mat\n\na hat on a cat\n\nthe mat sat\n\nat the hat, a cat sat"
VOCAB = 100
PATTERNS = ["(the|a) [a-z]+", "[a-z ]*at", "a( [a-z]+)?"]
TOLERANCE = {np.float32: 1e-4, np.float64: 1e-10}
HALF = settings(max_examples=max(4, settings.default.max_examples // 2))
SAMPLE = jax.jit(lambda arm, key: arm.sample(key, (64,)))
LOG_PROB = jax.jit(lambda arm, tokens: arm.log_prob(tokens))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT, VOCAB)


@functools.cache
def compiled(tokenizer, length, pattern):
    """The DFA of ``pattern`` over the space of ``length`` (one object per pattern, so that the
    exact decoders of several pseudocounts share their compiled programs)."""
    space = sp.SequenceSpace(vocab_size=VOCAB, length=length, eos=True)
    return sp.Lattice.regex(space, pattern, tokenizer)


def case(tokenizer, length, pattern, pseudocount):
    """``(space, dfa, dense base ARM, BigramCounts)`` of one configuration."""
    dfa = compiled(tokenizer, length, pattern)
    space = dfa.space
    base = ngram_base(tokenizer, space, 1, method="counts", pseudocount=pseudocount, text=TEXT)
    counts = bigram_counts(token_windows(tokenizer, space, TEXT), space, pseudocount)
    return space, dfa, base, counts


@pytest.mark.parametrize("order", [0, 1, 2])
@pytest.mark.parametrize("eos", [True, False])
def test_ngram_counts_count_the_markov_states_of_the_decisions_made(tokenizer, order, eos):
    space = sp.SequenceSpace(vocab_size=VOCAB, length=4, eos=eos)
    windows = token_windows(tokenizer, space, TEXT)
    lattice = sp.Lattice.markov(space, order)
    states = np.asarray(lattice.states(windows))
    made = np.ones(windows.shape, bool)
    if eos:  # up to the first EOS, never the forced last decision
        made = np.cumsum(windows == space.eos_id, 1) - (windows == space.eos_id) == 0
        made[:, -1] = False
    expected = np.zeros((lattice.num_states, space.num_actions))
    np.add.at(expected, (states[made], windows[made]), 1.0)
    s, a, c = ngram_counts(windows, space, order)
    got = np.zeros_like(expected)
    got[s, a] = c
    np.testing.assert_array_equal(got, expected)
    assert (np.diff(s * space.num_actions + a) > 0).all()  # CSR order, each pair once


def test_count_rows_rebuild_the_bigram_rows(tokenizer):
    space, _, base, counts = case(tokenizer, 3, PATTERNS[0], 0.3)
    expected = np.asarray(jax.nn.log_softmax(base.params, -1))
    rows = CountRows.build(counts, jnp.float64).rows(jnp.arange(VOCAB + 1))
    np.testing.assert_allclose(np.asarray(rows), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(counts.dense_row(VOCAB), expected[VOCAB], rtol=0, atol=1e-12)


@given(
    pattern=st.sampled_from(PATTERNS[:2]),
    pseudocount=st.floats(0.01, 5.0),
    dtype=st.sampled_from([np.float32, np.float64]),
)
@HALF
def test_factored_pass_equals_the_dense_product(tokenizer, pattern, pseudocount, dtype):
    space, dfa, base, counts = case(tokenizer, 4, pattern, pseudocount)
    conditioned = base.constrain(dfa)
    fact = factored_dp(counts, dfa, dtype)
    assert fact.values.dtype == dtype and fact.continuation.dtype == dtype
    rtol = TOLERANCE[dtype]
    np.testing.assert_allclose(fact.log_partition, conditioned.log_partition(), rtol=rtol)
    arm = fact.exact_arm()
    y = SAMPLE(arm, jax.random.key(0))
    log_p = LOG_PROB(arm, y)
    assert log_p.dtype == dtype
    expected = sp.to_arm(conditioned).log_prob(y)
    np.testing.assert_allclose(log_p, expected, rtol=rtol, atol=rtol)
    texts = detokenize(tokenizer, np.asarray(y))
    assert all(re.fullmatch(pattern, text) for text in texts), texts


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_factored_pass_equals_enumeration(tokenizer, dtype):
    """Every sequence of at most 2 tokens (10,101): the base's path probability, accepted by
    ``re.fullmatch``; log Z is their log-sum, the conditional their renormalisation."""
    pattern = "[a-z ]*at"
    space, dfa, base, counts = case(tokenizer, 2, pattern, 0.5)
    everything = space.enumerate()
    accepted = np.array(
        [re.fullmatch(pattern, t) is not None for t in detokenize(tokenizer, everything)]
    )
    log_base = np.asarray(base.log_prob(everything), np.float64)
    log_z = logsumexp(log_base[accepted])
    fact = factored_dp(counts, dfa, dtype)
    np.testing.assert_allclose(fact.log_partition, log_z, rtol=TOLERANCE[dtype])
    log_p = np.asarray(LOG_PROB(fact.exact_arm(), everything), np.float64)
    assert np.array_equal(np.isfinite(log_p), accepted)
    dense = sp.to_arm(base.constrain(dfa)).log_prob(everything)
    np.testing.assert_allclose(log_p, dense, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])
    np.testing.assert_allclose(
        log_p[accepted], log_base[accepted] - log_z, rtol=0, atol=10 * TOLERANCE[dtype]
    )


def test_nothing_accepted_gives_minus_infinity_and_no_decoder(tokenizer):
    space, _, _, counts = case(tokenizer, 3, PATTERNS[0], 0.1)
    nothing = sp.Lattice.automaton(space, np.zeros((1, VOCAB), int), 0, accepting=[])
    too_long = sp.Lattice.regex(space, "the cat sat on the mat", tokenizer)  # > 3 tokens
    for dfa in (nothing, too_long):
        fact = factored_dp(counts, dfa)
        assert fact.values.dtype == jnp.result_type(float)  # float64 here: x64 is on
        assert fact.log_partition == -np.inf
        assert not np.isnan(np.asarray(fact.values)).any()
        with pytest.raises(ValueError, match="accepts no sequence"):
            fact.exact_arm()


def test_bad_arguments_are_refused(tokenizer):
    space, dfa, _, counts = case(tokenizer, 3, PATTERNS[0], 0.1)
    windows = token_windows(tokenizer, space, TEXT)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(ValueError, match="pseudocount"):
            bigram_counts(windows, space, bad)
    fixed = sp.SequenceSpace(vocab_size=VOCAB, length=3, eos=False)
    with pytest.raises(ValueError, match="space must have EOS"):
        bigram_counts(token_windows(tokenizer, fixed, TEXT), fixed)
    with pytest.raises(ValueError, match="windows"):
        bigram_counts(windows[:, :-1], space)
    other = sp.SequenceSpace(vocab_size=VOCAB, length=4, eos=True)
    with pytest.raises(ValueError, match="dfa is over"):
        factored_dp(counts, sp.Lattice.regex(other, PATTERNS[0], tokenizer))
    bare = sp.Lattice.automaton(space, dfa.delta)
    with pytest.raises(ValueError, match="dfa carries no accepting states"):
        factored_dp(counts, bare)
