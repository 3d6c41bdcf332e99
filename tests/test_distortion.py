"""The distortion benchmark (models/distortion.py): its dynamic programs against
``sp.constraint_report``'s enumeration, its TV bounds against the exact TV, and the quick run of
``seqppl distortion`` (the exact decoder is the target; myopic masking runs away on JSON; the
exact option probabilities are the base's, renormalised). The figures are checked in
test_figures.py."""

import contextlib
import csv
import io

import jax.numpy as jnp
import numpy as np
import pytest
from seqppl.models.distortion import SUITE, constraint_lattice, run_distortion, suite_base
from seqppl.models.distortion_dp import DECODERS, distortion_reports, reachable_product
from seqppl.models.tv_bounds import accepted_sequences, kl_to_go, tv_bounds

import seqppl as sp
from seqppl.cli import main
from seqppl.options import options_lattice

_PADDED = 32  # every tiny product lattice padded to one size: one compilation for the tests


def _tiny(seed):
    """A random bigram over 7 tokens (at most 2 of them, as in the skill/cloud example below)
    and a random 4-state DFA (state 2 accepts) under which myopic masking emits invalid
    outputs."""
    rng = np.random.default_rng(seed)
    space = sp.SequenceSpace(vocab_size=7, length=2, eos=True)
    accepting = [False, False, True, False]
    dfa = sp.Lattice.automaton(space, rng.integers(0, 4, (4, 7)), 0, accepting=accepting)
    lat = sp.Lattice.markov(space, 1)
    logits = jnp.asarray(2 * rng.normal(size=(lat.num_states, 8)), jnp.float32)
    return sp.ARM.from_table(lat, logits), dfa


def test_dynamic_programs_match_the_enumerated_report():
    base, dfa = _tiny(0)
    out = distortion_reports(base, dfa, num_states=_PADDED)
    assert out["exact"].report.kl_reverse == 0 and out["exact"].report.p_invalid == 0
    for mode in ("myopic", "feasible"):
        ref = sp.constraint_report(sp.masked_arm(base, dfa, mode), base, dfa)
        got = out[mode].report
        fields = ("kl_reverse", "kl_forward", "tv", "p_invalid", "p_length_limit")
        fields += ("expected_length", "target_expected_length", "log_p_accepted")
        for field in fields:
            assert getattr(got, field) == pytest.approx(getattr(ref, field), abs=2e-5), field
        np.testing.assert_allclose(got.per_position_kl, ref.per_position_kl, atol=2e-5)


def _enumerated(model, space):
    """``p(y)`` float64 ``[N]`` of every sequence of ``space.enumerate()``."""
    return np.exp(np.asarray(model.log_prob(space.enumerate()), np.float64))


def test_option_probabilities_and_tv_by_enumeration():
    """docs/constraints.md's skill/cloud bigram: the option trie's accepting states give each
    option's probability (every sequence spelling it, summed) and TV is exact."""
    texts = ["sk", "ill", "y", "cl", "oud", "s", "k"]
    space = sp.SequenceSpace(vocab_size=7, length=2, eos=True)
    p = np.full((8, 8), 0.01)
    p[7, [0, 3, 5]] = [0.6, 0.2, 0.05]
    p[0, [1, 2]] = [0.05, 0.9]
    p[3, 4] = p[5, 6] = 0.9
    p[6, [1, 2]] = [0.1, 0.8]
    p[[1, 2, 4], 7] = 0.9
    base = sp.ARM.from_table(sp.Lattice.markov(space, 1), jnp.log(p / p.sum(1, keepdims=True)))
    trie = options_lattice(space, ["skill", "cloud"], texts)
    spelled = {"skill": (0, 1), "cloud": (3, 4)}  # "sk" "ill", "cl" "oud"
    states = {o: int(trie.delta[trie.delta[0, a], b]) for o, (a, b) in spelled.items()}
    out = distortion_reports(base, trie, options=states, num_states=_PADDED)
    text = ["".join(texts[i] for i in y if i < 7) for y in space.enumerate().tolist()]
    target = _enumerated(base, space) * np.isin(text, list(spelled))
    target /= target.sum()
    for mode in ("myopic", "feasible"):
        q = _enumerated(sp.masked_arm(base, trie, mode), space)
        got = out[mode].report
        for option in spelled:
            chosen = np.array(text) == option
            assert got.option_probabilities[option] == pytest.approx(q[chosen].sum(), abs=1e-6)
            wanted = target[chosen].sum()
            assert got.target_option_probabilities[option] == pytest.approx(wanted, abs=1e-6)
        assert got.tv == pytest.approx(0.5 * np.abs(q - target).sum(), abs=1e-6)
    assert out["myopic"].report.p_invalid > 0 and out["myopic"].report.kl_reverse == np.inf


def test_tv_bounds_bracket_the_exact_tv_and_kl_to_go_is_the_kl():
    base, dfa = _tiny(0)
    lat, on_lat, _, _ = reachable_product(base, dfa, _PADDED)
    decoder = sp.masked_arm(on_lat, lat, "myopic")
    exact = sp.to_arm(on_lat.constrain(lat))
    log_q, log_p = (np.asarray(m.log_policy_table()) for m in (decoder, exact))
    delta = np.asarray(lat.delta)
    space = lat.space
    tv = 0.5 * np.abs(_enumerated(decoder, space) - _enumerated(exact, space)).sum()
    for max_cells in (4, 8, 64, 1 << 20):  # depth 0, 1, 2: until every prefix fits
        low, high = tv_bounds(log_q, log_p, delta, lat.initial, space.eos_id, max_cells)
        assert low - 1e-6 <= tv <= high + 1e-6, max_cells
    assert high - low < 1e-6  # everything enumerated: exact
    kl = kl_to_go(log_p, log_q, delta, space.eos_id)[0, lat.initial]
    report = distortion_reports(base, dfa, num_states=_PADDED)["myopic"].report
    assert kl == pytest.approx(report.kl_forward, abs=1e-5)


def test_accepted_sequences_are_those_the_dfa_accepts():
    base, dfa = _tiny(1)
    space = dfa.space
    every = space.enumerate()
    final = np.asarray(dfa.states(every))[np.arange(len(every)), space.active(every).sum(-1) - 1]
    wanted = {tuple(y) for y, s in zip(every.tolist(), final, strict=True) if dfa.accepting[s]}
    got = accepted_sequences(dfa, 1000)
    assert {tuple(y) for y in got.tolist()} == wanted and len(got) == len(wanted)
    assert accepted_sequences(dfa, len(wanted) - 1) is None


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``seqppl distortion --quick`` in-process: (exit status, stdout, out folder)."""
    out = tmp_path_factory.mktemp("distortion")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = main(["distortion", "--quick", "--out", str(out)])
    return status, printed.getvalue(), out


@pytest.fixture(scope="module")
def quick_base():
    """``suite_base(quick=True)``: the quick run's token texts and bigram."""
    return suite_base(quick=True)


def _rows(out):
    with open(out / "distortion.csv") as file:
        return list(csv.DictReader(file))


def test_quick_run_writes_its_tables_and_figures(quick_run):
    status, printed, out = quick_run
    assert status == 0
    assert "| constraint | L | decoder |" in printed and "P(skill)" in printed
    assert "| constraint | L | decoder |" in (out / "distortion.md").read_text()
    names = ("distortion_per_position.png", "distortion_runaway.png", "distortion_options.png")
    for name in names:
        assert (out / name).stat().st_size > 10_000, name
    rows = _rows(out)
    assert [(r["constraint"], r["decoder"]) for r in rows] == [
        (c.name, d) for c in SUITE for d in DECODERS
    ]
    with open(out / "distortion_per_position.csv") as file:
        positions = list(csv.DictReader(file))
    assert len(positions) == len(rows) * (int(rows[0]["length_limit"]) + 1)


def test_quick_run_exact_decoder_is_the_target_and_myopic_runs_away(quick_run):
    rows = _rows(quick_run[2])
    for row in rows:
        value = {k: float(v) for k, v in row.items() if k not in ("constraint", "decoder") and v}
        assert value["p_length_limit"] <= value["p_invalid"] + 1e-9
        assert value["tv_low"] <= value["tv_high"] + 1e-9
        if row["decoder"] == "exact":
            assert value["kl_reverse"] < 1e-5 and value["kl_forward"] < 1e-5, row["constraint"]
            assert value["p_invalid"] == 0 and value["tv"] == 0, row["constraint"]
            assert value["expected_length"] == pytest.approx(value["target_expected_length"])
        if row["decoder"] == "feasible":  # the base gives every token some probability
            assert value["p_invalid"] == 0 and np.isfinite(value["kl_reverse"])
    myopic = {r["constraint"]: float(r["p_invalid"]) for r in rows if r["decoder"] == "myopic"}
    assert max(myopic["json"], myopic["brackets"]) > 0
    assert myopic["json"] > 0.5  # whitespace without end: it runs to the length limit


def test_quick_run_exact_option_probabilities_are_the_bases(quick_run, quick_base):
    """P_exact(o) = P_base(o) / Σ_o' P_base(o'), P_base(o) summed over every tokenisation of o
    (path probabilities of the base, no DP), against the masking decoders' first-token bias."""
    rows = {r["decoder"]: r for r in _rows(quick_run[2]) if r["constraint"] == "options"}
    texts, bigram = quick_base
    (constraint,) = (c for c in SUITE if c.name == "options")
    space = sp.SequenceSpace(len(texts), int(rows["exact"]["length_limit"]), eos=True)
    base = sp.ARM.from_table(sp.Lattice.markov(space, 1), bigram.params)
    mass = {}
    for option in constraint.options:
        spellings = accepted_sequences(options_lattice(space, [option], texts), 10_000)
        mass[option] = float(np.exp(np.asarray(base.log_prob(spellings), np.float64)).sum())
    total = sum(mass.values())
    assert total == pytest.approx(np.exp(float(rows["exact"]["log_p_accepted"])), rel=1e-4)
    for option in constraint.options:
        got = float(rows["exact"][f"target_p_option[{option}]"])
        assert got == pytest.approx(mass[option] / total, abs=1e-5)
        assert float(rows["exact"][f"p_option[{option}]"]) == pytest.approx(got, abs=1e-5)
    masked = {o: float(rows["myopic"][f"p_option[{o}]"]) for o in constraint.options}
    assert max(abs(masked[o] - mass[o] / total) for o in masked) > 0.1  # the first-token bias


def test_constraint_lattices_accept_their_examples(quick_base):
    texts, _ = quick_base
    space = sp.SequenceSpace(len(texts), 24, eos=True)
    examples = {
        "json": '{"id": 12,\n  "ok": true}',
        "options": "skip",
        "date": "2024-01-31",
        "identifier": "my_var2",
        "brackets": "(()())",
    }
    for constraint in SUITE:
        dfa, _ = constraint_lattice(constraint, space, texts)
        state = dfa.initial
        for character in examples[constraint.name]:  # every character is a token of its own
            state = int(dfa.delta[state, texts.index(character)])
        assert dfa.accepting[state], constraint.name


@pytest.mark.slow
def test_full_run(tmp_path):
    """The run behind docs/distortion.md (about 30 s on 2 cores)."""
    rows = run_distortion(tmp_path, seed=0)
    by = {(r["constraint"], r["decoder"]): r for r in rows}
    for constraint in SUITE:
        exact = by[constraint.name, "exact"]
        assert exact["kl_reverse"] < 1e-5 and exact["p_invalid"] == 0 and exact["tv"] == 0
        assert by[constraint.name, "feasible"]["p_invalid"] == 0
    assert by["json", "myopic"]["p_length_limit"] > 0.5
    assert by["json", "feasible"]["kl_reverse"] > 1  # valid, but far from the conditional
    assert (tmp_path / "distortion.md").is_file()
