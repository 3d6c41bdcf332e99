"""Constraints compiled from specifications (outlines-core) against oracles nobody here wrote:
Python's ``re.fullmatch`` on the detokenised text, ``json.loads``, enumeration and χ²."""

import itertools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

import seqppl as sp
from seqppl import constraints

CHI2_ALPHA = 1e-3  # false-alarm rate of the goodness-of-fit test (a fixed seed: reproducible)
HALF = settings(max_examples=max(4, settings.default.max_examples // 2))


@st.composite
def patterns(draw, depth: int = 3):
    """Patterns in the syntax Rust's ``regex`` and Python's ``re`` share, over ``a``–``c``."""
    if depth == 0 or draw(st.integers(0, 3)) == 0:
        return draw(st.sampled_from(["a", "b", "c", "[ab]", "[^a]", "(?:ab)"]))
    kind = draw(st.sampled_from(["cat", "alt", "star", "plus", "opt", "count"]))
    inner = draw(patterns(depth - 1))
    if kind == "cat":
        return inner + draw(patterns(depth - 1))
    if kind == "alt":
        return f"(?:{inner}|{draw(patterns(depth - 1))})"
    if kind == "count":
        low = draw(st.integers(0, 2))
        return f"(?:{inner}){{{low},{low + draw(st.integers(0, 2))}}}"
    return f"(?:{inner}){ {'star': '*', 'plus': '+', 'opt': '?'}[kind] }"


@st.composite
def vocabularies(draw):
    """Token texts over ``a``–``c``: single characters and some multi-character tokens."""
    extra = draw(st.lists(st.text("abc", min_size=2, max_size=3), max_size=3, unique=True))
    base = draw(st.sampled_from([["a", "b", "c"], ["a", "b"], ["c", "b", "a"]]))
    return base + [t for t in extra if t not in base]


def _accepts(delta, initial, accepting, tokens):
    state = initial
    for token in tokens:
        state = delta[state, token]
    return bool(accepting[state])


@HALF
@given(patterns(), vocabularies())
def test_compiled_dfa_accepts_exactly_what_re_fullmatch_accepts(pattern, texts):
    """Oracle: every token sequence of up to 4 tokens is accepted iff its text fullmatches."""
    try:
        delta, initial, accepting = constraints.compile_regex(pattern, texts)
    except ValueError as error:  # no sequence over this vocabulary matches: check that
        assert "matches" in str(error)
        return
    assert not accepting[-1] and (delta[-1] == delta.shape[0] - 1).all()  # the dead state
    for n in range(5):
        for seq in itertools.product(range(len(texts)), repeat=n):
            text = "".join(texts[t] for t in seq)
            expected = re.fullmatch(pattern, text) is not None
            assert _accepts(delta, initial, accepting, seq) == expected, (pattern, texts, seq)


def test_transitions_out_of_an_accepted_prefix_are_kept():
    """Regression for outlines-core 0.2.14's index, which drops a transition from an accepted
    prefix into a non-accepted one: ``(b|c)*b`` must accept ``bcb``."""
    from outlines_core import Index, Vocabulary

    raw = Index("(b|c)*b", Vocabulary(3, {"a": [0], "b": [1], "c": [2]}))
    after_b = raw.get_next_state(raw.get_initial_state(), 1)
    assert raw.get_next_state(after_b, 2) is None  # the upstream behaviour this works around
    delta, initial, accepting = constraints.compile_regex("(b|c)*b", ["a", "b", "c"])
    assert delta.shape[0] == 3  # minimal: not ending in b, ending in b, dead
    assert _accepts(delta, initial, accepting, [1, 2, 1])
    assert not _accepts(delta, initial, accepting, [1, 2])


def test_dead_states_are_pruned_and_empty_tokens_keep_the_state():
    delta, initial, accepting = constraints.compile_regex("ab", ["a", "b", "", "ba"])
    assert delta.shape == (4, 4)  # start, after a, after ab, dead
    assert delta[initial, 2] == initial and delta[initial, 3] == 3
    with pytest.raises(ValueError, match="no token sequence"):
        constraints.compile_regex("x", ["a", "b"])
    with pytest.raises(ValueError, match="could not be compiled"):
        constraints.compile_regex("(a", ["a"])


def _problem(pattern, texts, length=5, eos=True, seed=0):
    space = sp.SequenceSpace(len(texts), length, eos=eos)
    bigram = sp.Lattice.markov(space, 1)
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.standard_normal((bigram.num_states, space.num_actions)))
    base = sp.ARM.from_table(bigram, logits)
    return space, base, sp.Lattice.regex(space, pattern, texts)


def _texts(space, texts, seqs):
    return ["".join(texts[t] for t in row if t < space.vocab_size) for row in np.asarray(seqs)]


@pytest.mark.parametrize("eos", [True, False], ids=["eos", "fixed"])
def test_log_probability_of_a_regex_and_exact_samples_match_enumeration(eos):
    """Oracles: ``base.constrain(dfa).log_partition()`` equals ``log Σ p_base(y)`` over the
    enumerated ``y`` whose text fullmatches; the exact ARM's samples all fullmatch and their
    frequencies pass χ² against the enumerated conditional."""
    texts = ["a", "b", "ab", "ba", "c"]
    pattern = "(?:ab|c)+a?"
    space, base, dfa = _problem(pattern, texts, length=4, eos=eos)
    seqs = np.asarray(space.enumerate())
    matches = np.array([re.fullmatch(pattern, t) is not None for t in _texts(space, texts, seqs)])
    log_p = np.asarray(base.log_prob(jnp.asarray(seqs)), np.float64)
    expected = np.logaddexp.reduce(log_p[matches])
    conditioned = base.constrain(dfa)
    assert float(conditioned.log_partition()) == pytest.approx(expected, abs=1e-5)
    exact = sp.to_arm(conditioned)
    draws = np.asarray(exact.sample(jax.random.key(0), (4000,)))
    assert all(re.fullmatch(pattern, t) for t in _texts(space, texts, draws))
    index = {tuple(s): i for i, s in enumerate(seqs)}
    counts = np.bincount([index[tuple(d)] for d in draws], minlength=len(seqs))[matches]
    probs = np.exp(log_p[matches] - expected)
    e, big = len(draws) * probs, len(draws) * probs >= 5
    c = np.append(counts[big], counts[~big].sum())
    e = np.append(e[big], e[~big].sum())
    assert stats.chi2.sf(((c - e) ** 2 / e).sum(), len(e) - 1) > CHI2_ALPHA


def test_json_schema_samples_parse_and_validate():
    """Every exact sample of a bigram constrained by a small schema is valid JSON of it."""
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 9}},
        "required": ["ok", "n"],
    }
    texts = list('{}":, ') + ["ok", "n", "true", "false", *"0123456789", "-"]
    space = sp.SequenceSpace(len(texts), 18, eos=True)
    dfa = sp.Lattice.json_schema(space, schema, texts)
    bigram = sp.Lattice.markov(space, 1)
    base = sp.ARM.from_table(bigram, jnp.zeros((bigram.num_states, space.num_actions)))
    draws = sp.to_arm(base.constrain(dfa)).sample(jax.random.key(1), (200,))
    for text in _texts(space, texts, draws):
        doc = json.loads(text)
        assert set(doc) == {"ok", "n"} and isinstance(doc["ok"], bool), text
        assert isinstance(doc["n"], int), text


def test_helpers_write_patterns_for_what_people_write_by_hand():
    """Oracles: Python's own reading of each helper's language on every short text."""
    alphabet = ["a", "b", "(", ")", "."]
    cases = {
        constraints.options(["ab", "a.b", "b"]): lambda t: t in ("ab", "a.b", "b"),
        constraints.contains("a.", "[ab().]"): lambda t: "a." in t,
        constraints.repeat("ab", 1, 2): lambda t: t in ("ab", "abab"),
        constraints.dyck(2): lambda t: _balanced(t, 2),
    }
    for pattern, oracle in cases.items():
        delta, initial, accepting = constraints.compile_regex(pattern, alphabet)
        for n in range(6):
            for seq in itertools.product(range(len(alphabet)), repeat=n):
                text = "".join(alphabet[t] for t in seq)
                assert _accepts(delta, initial, accepting, seq) == oracle(text), (pattern, text)


def _balanced(text: str, max_depth: int) -> bool:
    depth = 0
    for c in text:
        if c not in "()":
            return False
        depth += 1 if c == "(" else -1
        if depth < 0 or depth > max_depth:
            return False
    return depth == 0


def test_regex_lattices_compose_with_products_and_ebm_constraints():
    """``dfa.accepting`` is the default of ``constrain`` and survives products; the DFA of a
    regex intersected with a Markov lattice accepts what both accept."""
    space, base, dfa = _problem("a(?:b|ab)*", ["a", "b", "ab"], length=4)
    ebm = sp.to_ebm(base, normalized=True)
    assert float(ebm.constrain(dfa).log_partition()) == pytest.approx(
        float(ebm.constrain(dfa, dfa.accepting).log_partition()), abs=1e-6
    )
    joint = sp.Lattice.markov(space, 1).product(dfa)
    np.testing.assert_array_equal(joint.accepting, np.tile(dfa.accepting, space.vocab_size + 1))
    with pytest.raises(ValueError, match="accepting is required"):
        sp.Lattice.markov(space, 1).accepting_rewards()
    with pytest.raises(ValueError, match="3 strings"):
        sp.Lattice.regex(space, "a", ["a", "b"])
