"""Masking decoders (myopic, feasible) and the constraint report, against enumeration oracles.

The oracle decodes every sequence by hand: the DFA walked along each prefix, feasibility read off
the accepted sequences that extend it, co-reachability by a forward search, the base's rows
renormalised over what is left (EOS, or the unmasked base row in a fixed-length space, where
nothing is).
"""

from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from seqppl.models.tasks import digit_sum_task, locally_masked_arm

import seqppl as sp
from seqppl import constraints
from seqppl.masking import MASKING_MODES
from seqppl.masking_report import ending_figures
from seqppl.options import options_lattice

from . import oracles
from .strategies import arm_tables, assert_close, automata, lattices, prompts, spaces, tolerance

# each example builds new lattices (new programs): half the profile's examples
HALF = settings(max_examples=max(4, settings.default.max_examples // 2))
log_prob = jax.jit(lambda dist, y: dist.log_prob(y))  # one program per decoder, not many ops


def _accepted(dfa, accept, start, y) -> bool:
    """Does the DFA, read along ``y`` from ``start``, end in an accepting state."""
    space = dfa.space
    tau = oracles.response_length(y, space.eos_id)
    if space.eos:
        return bool(accept[oracles.walk(dfa.delta, start, y[:tau])[-1]])
    return bool(accept[dfa.delta[oracles.walk(dfa.delta, start, y)[-1], y[-1]]])


def _live(dfa, accept, state) -> bool:
    """Is an accepting state reachable from ``state`` (forward search over tokens)."""
    seen, todo = {int(state)}, [int(state)]
    while todo:
        s = todo.pop()
        if accept[s]:
            return True
        for nxt in dfa.delta[s, : dfa.space.vocab_size]:
            if int(nxt) not in seen:
                seen.add(int(nxt))
                todo.append(int(nxt))
    return False


def _oracle(q, lat, dfa, accept, mode, prompt=None):
    """``(seqs [N, T], log p_dec [N], accepted [N])`` by enumeration, float64."""
    space = lat.space
    V, T, A = space.vocab_size, space.horizon, space.num_actions
    seqs = oracles.all_sequences(V, space.length, space.eos)
    q = oracles.as_time_table(q, T).copy()
    if space.eos:
        q[-1, :, :V] = -np.inf
    d0, s0 = oracles.prompt_start(dfa, prompt), oracles.prompt_start(lat, prompt)
    accepted = np.array([_accepted(dfa, accept, d0, y) for y in seqs])
    extends = defaultdict(bool)  # prefix (with its next action) -> some accepted completion
    for y, ok in zip(seqs, accepted, strict=True):
        for t in range(oracles.response_length(y, space.eos_id)):
            extends[tuple(y[: t + 1])] |= bool(ok)
    log_p = np.zeros(len(seqs))
    for n, y in enumerate(seqs):
        tau = oracles.response_length(y, space.eos_id)
        base, dstates = oracles.walk(lat.delta, s0, y[:tau]), oracles.walk(dfa.delta, d0, y[:tau])
        for t in range(tau):
            allowed = np.zeros(A, bool)
            for a in range(A):
                if mode == "feasible":
                    allowed[a] = extends[(*y[:t], a)]
                elif a == space.eos_id:
                    allowed[a] = accept[dstates[t]]
                elif t == T - 1 and not space.eos:
                    allowed[a] = accept[dfa.delta[dstates[t], a]]
                else:
                    allowed[a] = _live(dfa, accept, dfa.delta[dstates[t], a])
            row = np.where(allowed, q[t, base[t]], -np.inf)
            if np.all(row == -np.inf):
                row = (
                    np.where(np.arange(A) == space.eos_id, 0.0, -np.inf)
                    if space.eos
                    else q[t, base[t]]
                )
            log_p[n] += row[y[t]] - oracles.logsumexp_np(row)
    return seqs, log_p, accepted


def _figures(seqs, log_p, accepted, space):
    """``(p_invalid, p_length_limit, expected_length)`` by enumeration."""
    p = np.exp(log_p)
    tau = np.array([oracles.response_length(y, space.eos_id) for y in seqs])
    length = tau - 1 if space.eos else tau
    limit = ~accepted & (length == space.length)
    return p[~accepted].sum(), p[limit].sum(), (p * length).sum()


@HALF
@given(st.data(), spaces(), st.sampled_from(["myopic", "feasible"]))
def test_masked_decoders_match_the_enumerated_masking(data, space, mode):
    """log p_dec(y) of every sequence and the ending figures equal the oracle's; it sums to 1;
    feasible masking of a base with full support never emits an invalid output."""
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    lat = data.draw(lattices(space))
    q, scale = data.draw(arm_tables(lat, dtype))
    dfa = data.draw(automata(space, max_states=3))
    flags = st.lists(st.booleans(), min_size=dfa.num_states, max_size=dfa.num_states)
    accept = np.array(data.draw(flags))
    prompt = data.draw(prompts(space))
    dec = sp.masked_arm(sp.ARM.from_table(lat, jnp.asarray(q), prompt), dfa, mode, accept)
    seqs, log_p, accepted = _oracle(q, lat, dfa, accept, mode, prompt)
    tol = tolerance(dtype, space.horizon, scale)
    assert_close(log_prob(dec, jnp.asarray(seqs)), log_p, tol, f"{mode} log_prob")
    assert abs(np.exp(log_p).sum() - 1) < 1e-9
    sp.ARM.from_table(dec.lattice, dec.params, prompt)  # validated: no reachable dead end
    if prompt is None:  # occupancy takes the decoder's single prompt; none here
        expected = _figures(seqs, log_p, accepted, space)
        got = ending_figures(dec, dfa, accept)
        np.testing.assert_allclose(got, expected, atol=1e-4 if dtype == np.float32 else 1e-9)
        if mode == "feasible" and np.isfinite(q).all() and accepted.any():
            assert got[0] == 0.0


def test_callable_masking_equals_table_masking():
    """A callable ARM (with or without params, with a prompt) masked by running the DFA along
    the prefix gives the table decoder's log-probabilities."""
    space = sp.SequenceSpace(vocab_size=3, length=3, eos=True)
    lat = sp.Lattice.markov(space, 1)
    q = jax.random.normal(jax.random.key(0), (space.horizon, lat.num_states, space.num_actions))
    dfa = sp.Lattice.automaton(space, [[1, 0, 2], [1, 1, 2], [2, 2, 2]], accepting=[1])
    prompt = jnp.array([1])
    table = sp.ARM.from_table(lat, q, prompt)
    seqs = jnp.asarray(space.enumerate())
    with_params = sp.ARM(
        lambda p, y, prompt: table.with_params(p).logits(y), space, prompt, params=q
    )
    without = sp.ARM(lambda y, prompt: table.logits(y), space, prompt)
    for mode, base in zip(MASKING_MODES, (with_params, without), strict=True):
        dec = sp.masked_arm(base, dfa, mode)
        assert dec.lattice is None
        expected = log_prob(sp.masked_arm(table, dfa, mode), seqs)
        np.testing.assert_allclose(log_prob(dec, seqs), expected, atol=1e-6)


def test_digit_sum_feasible_is_valid_but_not_exact_and_m_is_exact():
    """The lookahead task: feasible masking never emits an invalid output yet is off the target
    (it cannot weigh completions); the exact M is on it; myopic masking only forbids EOS before
    the sum is right, so it runs into the length limit (its only invalid outputs)."""
    space = sp.SequenceSpace(vocab_size=3, length=3, eos=True)
    task = digit_sum_task(space, modulus=3, seed=1)
    base = sp.ARM.from_table(sp.Lattice.markov(space, 1), task.bigram_logits)
    dfa = task.constraint
    feasible = sp.masked_arm(base, dfa, "feasible", accepting=[0])
    report = sp.constraint_report(feasible, base, dfa, [0])
    assert report.p_invalid == 0.0 and report.p_length_limit == 0.0
    assert report.kl_reverse > 1e-2 and np.isfinite(report.kl_forward)
    np.testing.assert_allclose(report.per_position_kl.sum(), report.kl_reverse, rtol=1e-4)
    zero = np.arange(3) == 0  # accepting: digit sum ≡ 0
    seqs, log_p, accepted = _oracle(base.log_policy_table(), base.lattice, dfa, zero, "feasible")
    log_target = np.array([oracles.sequence_reward(task.rewards, task.lattice, y) for y in seqs])
    log_target -= oracles.logsumexp_np(log_target)
    kept = log_p > -np.inf
    kl = np.sum(np.exp(log_p[kept]) * (log_p[kept] - log_target[kept]))
    assert report.kl_reverse == pytest.approx(kl, abs=1e-5)
    assert report.expected_length == pytest.approx(_figures(seqs, log_p, accepted, space)[2])
    exact = sp.to_arm(base.constrain(dfa, [0]))  # M: the target itself, so KL = 0
    assert_close(log_prob(exact, jnp.asarray(seqs)), log_target, 1e-5, "exact M")
    assert ending_figures(exact, dfa, [0])[0] == 0.0
    target_length = _figures(seqs, log_target, accepted, space)[2]
    assert report.target_expected_length == pytest.approx(target_length)
    myopic = sp.masked_arm(base, dfa, "myopic", accepting=[0])
    seqs, log_p, accepted = _oracle(base.log_policy_table(), base.lattice, dfa, zero, "myopic")
    p_invalid, p_limit, length = ending_figures(myopic, dfa, [0])
    assert p_invalid == pytest.approx(p_limit) and p_invalid > 0.1
    expected = _figures(seqs, log_p, accepted, space)
    np.testing.assert_allclose((p_invalid, p_limit, length), expected, atol=1e-5)
    old_style = locally_masked_arm(task)  # the task's decoder is sp.masked_arm now
    assert old_style.lattice is task.lattice
    seqs = jnp.asarray(seqs)
    np.testing.assert_allclose(log_prob(old_style, seqs), log_prob(feasible, seqs), atol=1e-6)


TOKENS = ["sk", "ill", "y", "cl", "oud", "s", "k"]


def _skill_base():
    """guidance#564: a bigram that wants "sky" (first token "sk"); options "skill", "cloud"."""
    space = sp.SequenceSpace(vocab_size=len(TOKENS), length=2, eos=True)
    V = space.vocab_size
    p = np.full((V + 1, V + 1), 0.01)  # rows: previous token (V at the start); columns: action
    p[V, [0, 3, 5]] = [0.6, 0.2, 0.05]  # "sk", "cl", "s"
    p[0, [1, 2]] = [0.05, 0.9]  # "sk" -> "ill" or "y"
    p[3, 4] = p[5, 6] = 0.9  # "cl" -> "oud", "s" -> "k"
    p[6, [1, 2]] = [0.1, 0.8]
    p[[1, 2, 4], V] = 0.9  # EOS after "ill", "y", "oud"
    lat = sp.Lattice.markov(space, 1)
    return sp.ARM.from_table(lat, jnp.log(p / p.sum(1, keepdims=True))), space


def test_first_token_bias_of_masked_decoders():
    """Both masking decoders pick "skill" (its first token "sk" is what the base wants, for
    "sky"); the exact conditional's option probabilities are the base's probability ratios."""
    base, space = _skill_base()
    options = ["skill", "cloud"]
    dfa = sp.Lattice.regex(space, constraints.options(options), TOKENS)  # select(options)
    seqs = oracles.all_sequences(space.vocab_size, space.length, True)
    text = np.array(["".join(TOKENS[a] for a in y if a < space.vocab_size) for y in seqs])
    p_base = np.exp([oracles.arm_log_prob(base.params, base.lattice, y) for y in seqs])
    ratio = {o: p_base[text == o].sum() / p_base[np.isin(text, options)].sum() for o in options}
    report = sp.constraint_report(
        sp.masked_arm(base, dfa, "myopic"), base, dfa, options=options, tokens=TOKENS
    )
    feasible = sp.masked_arm(base, dfa, "feasible")
    for mode, chosen in (("myopic", report.option_probabilities), ("feasible", {})):
        _, log_p, accepted = _oracle(base.params, base.lattice, dfa, dfa.accepting, mode)
        p_dec = np.exp(log_p)
        for o in options:
            if mode == "feasible":  # the report's route: the decoder constrained to spell o
                spelled = options_lattice(space, [o], TOKENS)
                chosen[o] = np.exp(
                    sp.to_ebm(feasible, normalized=True).constrain(spelled).log_partition()
                )
            assert chosen[o] == pytest.approx(p_dec[text == o].sum(), abs=1e-6)
            assert report.target_option_probabilities[o] == pytest.approx(ratio[o], abs=1e-6)
        assert chosen["skill"] > 0.7 > 0.2 > ratio["skill"]
        p_invalid = report.p_invalid if mode == "myopic" else ending_figures(feasible, dfa)[0]
        assert p_invalid == pytest.approx(p_dec[~accepted].sum(), abs=1e-6)
    assert report.p_invalid == pytest.approx(0.05 / 0.85, rel=1e-5)  # "s", "k": then no room
    assert report.kl_reverse == np.inf and p_invalid == 0.0
    assert "P('skill')" in str(report) and "p_option[skill]" in report.attrs()


def test_options_lattice_accepts_exactly_the_spellings():
    """Strings match every tokenisation (an empty token leaves the state alone); token ids
    match that sequence only; fixed-length spaces too."""
    tokens = ["a", "b", "ab", ""]
    for eos in (True, False):
        space = sp.SequenceSpace(vocab_size=4, length=3, eos=eos)
        seqs = oracles.all_sequences(4, 3, eos)
        for options in (["ab", "b"], [[0, 1], [2]]):
            dfa = options_lattice(space, options, tokens)
            got = np.array([_accepted(dfa, dfa.accepting, 0, y) for y in seqs])
            if isinstance(options[0], str):  # the same set as Lattice.regex of the options
                regex = sp.Lattice.regex(space, constraints.options(options), tokens)
                start = regex.initial
                same = [_accepted(regex, regex.accepting, start, y) for y in seqs]
                np.testing.assert_array_equal(got, same)
            body = [tuple(int(a) for a in y if a < 4) for y in seqs]
            if isinstance(options[0], str):
                want = np.array(["".join(tokens[a] for a in b) in options for b in body])
            else:
                want = np.array([b in {tuple(o) for o in options} for b in body])
            np.testing.assert_array_equal(got, want)


def test_bad_input_is_refused():
    space = sp.SequenceSpace(vocab_size=2, length=2, eos=True)
    base = sp.ARM.from_table(sp.Lattice.markov(space, 0), jnp.zeros((1, 3)))
    plain = sp.Lattice.automaton(space, [[1, 0], [1, 1]])
    with pytest.raises(ValueError, match="accepting is required"):
        sp.masked_arm(base, plain)
    with pytest.raises(ValueError, match="mode must be one of"):
        sp.masked_arm(base, plain, "greedy", accepting=[1])
    other = sp.Lattice.automaton(sp.SequenceSpace(3, 2), [[0, 0, 0]], accepting=[0])
    with pytest.raises(ValueError, match="dfa is over"):
        sp.masked_arm(base, other)
    with pytest.raises(ValueError, match="no output is accepted"):
        sp.constraint_report(base, base, plain, accepting=[])
    with pytest.raises(ValueError, match="need tokens"):
        options_lattice(space, ["ab"])
    with pytest.raises(ValueError, match=r"options\[0\]\[1\] = 5"):
        options_lattice(space, [[0, 5]])
