"""Learned twists (``sp.fit_twist``) and conditional SMC's upper bound, against enumeration."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import seqppl as sp
from seqppl.twists import build_twist

PATTERN = "(?:0|1)*2(?:3|0)*"


def _unigram_under_a_regex(seed=0):
    """``(callable unigram base, its table, regex DFA)``: under a unigram base the probability
    of acceptance given a prefix depends on its DFA state and length only, so a table twist can
    be exact."""
    space = sp.SequenceSpace(4, 6, eos=True)
    lat = sp.Lattice.markov(space, 0)
    logits = np.random.default_rng(seed).standard_normal((1, space.num_actions))
    table = sp.ARM.from_table(lat, jnp.asarray(logits))
    dfa = sp.Lattice.regex(space, PATTERN, ["0", "1", "2", "3"])
    return sp.ARM(lambda y: table.logits(y), space), table, dfa


def _acceptance_by_enumeration(table, dfa):
    """``{(t, d): log P(accepted | prefix)}`` over every prefix of every sequence, with the
    check that all prefixes of one (t, d) agree (brute force: sums over the enumerated space)."""
    space = table.space
    y = space.enumerate()
    log_p = np.asarray(table.log_prob(y))
    accepted = np.asarray(dfa.accepting)[np.asarray(dfa.states(y))[:, -1]]
    states = np.asarray(dfa.states(y))
    out = {}
    for t in range(space.horizon):
        live = (y[:, :t] != space.eos_id).all(1)  # prefixes that still decide at t
        groups = {}
        for row in np.flatnonzero(live):
            groups.setdefault(tuple(y[row, :t]), []).append(row)
        for rows in groups.values():
            mass = np.logaddexp.reduce(log_p[rows])
            good = np.logaddexp.reduce(np.where(accepted[rows], log_p[rows], -np.inf))
            key = (t, int(states[rows[0], t]))
            value = good - mass
            assert np.isclose(out.setdefault(key, value), value, atol=1e-9) or value == -np.inf
    return out


def test_fit_twist_recovers_the_acceptance_probabilities_of_a_unigram_base():
    base, table, dfa = _unigram_under_a_regex()
    twist, history = sp.fit_twist(base, dfa, jax.random.key(0), steps=300, progress=False)
    assert history["loss"][-1] < 1e-4 < history["loss"][0]
    values = np.asarray(twist.values)
    for (t, d), expected in _acceptance_by_enumeration(table, dfa).items():
        if expected == -np.inf:
            assert values[t, d] == -np.inf, (t, d)
        else:
            assert abs(values[t, d] - expected) < 5e-3, (t, d, values[t, d], expected)
    assert (values[-1] == np.where(np.asarray(dfa.accepting), 0.0, -np.inf)).all()


def test_an_exact_learned_twist_makes_smc_exact_and_matches_its_total_form():
    """With the exact table and the exact constrained ARM as proposal every increment after the
    first is 0 (zero variance); the twist SMC carries step by step (running the base's decoder,
    or reusing the proposal's log π when the proposal is the base) equals ``log_phi``."""
    base, table, dfa = _unigram_under_a_regex(seed=1)
    target = base.constrain(dfa)
    exact = float(table.constrain(dfa).log_partition())
    twist, _ = sp.fit_twist(base, dfa, jax.random.key(1), steps=300, progress=False)
    exact_arm = sp.to_arm(table.constrain(dfa))
    proposal = sp.ARM(lambda y: exact_arm.logits(y), base.space)
    est = sp.log_partition(target, "smc", proposal, 128, jax.random.key(2), twist=twist)
    assert abs(est.log_z - exact) < 1e-4 and est.stderr < 1e-4
    y = base.sample(jax.random.key(3), (64,))
    eos = y == base.space.eos_id
    done = jnp.cumsum(eos, -1) - eos > 0
    log_pi = jnp.take_along_axis(base.log_policies(y), y[..., None], -1)[..., 0]
    log_pi = jnp.where(done, 0.0, log_pi)
    for spec in ("table", "table by the proposal"):
        carried = build_twist(spec, twist, len(y))
        state, phis = carried.state, []
        for t in range(base.space.horizon):
            state, phi = carried.update(state, y, y[:, t], done[:, t], log_pi[:, t], t)
            phis.append(phi)
        np.testing.assert_allclose(jnp.stack(phis, -1), twist.log_phi(y), atol=1e-9)


def test_a_table_twist_from_the_exact_lattice_makes_smc_exact():
    """``TableTwist.from_lattice`` of the target itself (a lattice EBM) with its exact ARM as the
    proposal: the lattice's soft values on the base's prefix are the exact twist."""
    _, table, dfa = _unigram_under_a_regex(seed=3)
    target = table.constrain(dfa)
    twist = sp.TableTwist.from_lattice(table, target)
    est = sp.log_partition(target, "smc", sp.to_arm(target), 128, jax.random.key(0), twist=twist)
    assert abs(est.log_z - float(target.log_partition())) < 1e-9 and est.stderr < 1e-9
    with pytest.raises(TypeError, match="approx must be an EBM on lattices"):
        sp.TableTwist.from_lattice(table, table)


def test_a_learned_twist_of_the_exact_arm_is_the_constraint_alone():
    """For a base that already satisfies the constraint, ``h = 0`` wherever acceptance remains
    possible (up to Adam's last steps), and SMC with the base as proposal and that twist (which
    reuses the proposal's log-probabilities) is exact: log Z = 0."""
    _, table, dfa = _unigram_under_a_regex(seed=2)
    exact_arm = sp.to_arm(table.constrain(dfa))
    twist, _ = sp.fit_twist(exact_arm, dfa, jax.random.key(0), steps=300, progress=False)
    values = np.asarray(twist.values)
    finite = np.isfinite(values)
    assert np.abs(values[finite]).max() < 2e-3
    exact_twist = sp.TableTwist(jnp.where(finite, 0.0, -jnp.inf), exact_arm, dfa)
    target = exact_arm.constrain(dfa)
    est = sp.log_partition(target, "smc", exact_arm, 128, jax.random.key(1), twist=exact_twist)
    assert abs(est.log_z) < 1e-9 and est.stderr < 1e-9


def _sandwiches(est, exact, z) -> bool:
    """``elbo − z·se ≤ log Z ≤ eubo + z·se``; an elbo of −∞ (a replicate lost every particle:
    ``(−∞, NaN)``) bounds trivially."""
    low = est.elbo if est.elbo == -np.inf else est.elbo - z * est.elbo_stderr
    return low <= exact <= est.eubo + z * est.eubo_stderr


def _bigram_target(as_callable=True):
    """``(base, regex DFA, the lattice target, exact log Z)``: a random bigram, given as a
    callable ARM (no lattice for SMC to use) or as its table."""
    space = sp.SequenceSpace(4, 6, eos=True)
    lat = sp.Lattice.markov(space, 1)
    logits = np.random.default_rng(0).standard_normal((lat.num_states, 5))
    table = sp.ARM.from_table(lat, jnp.asarray(logits))
    dfa = sp.Lattice.regex(space, PATTERN, ["0", "1", "2", "3"])
    base = sp.ARM(lambda y: table.logits(y), space) if as_callable else table
    return base, dfa, table.constrain(dfa), float(table.constrain(dfa).log_partition())


def test_conditional_smc_bounds_log_z_from_above_with_an_unbiased_inverse():
    """``E[1/Ẑ_CSMC] = P(Ẑ_SMC > 0) / Z``: with a feasibly masked proposal no particle dies, so
    ``1/Ẑ_CSMC`` is unbiased for ``1/Z`` (checked over 128 conditional runs of 4 particles,
    within 4 standard errors), and the sandwich ``elbo ≤ log Z ≤ eubo`` holds within 3 standard
    errors, the conditional bound below the proposal's EUBO."""
    base, dfa, target, exact = _bigram_target(as_callable=False)
    masked = sp.masked_arm(base, dfa, "feasible")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", sp.EstimateWarning)
        est = sp.log_partition(target, "smc", masked, 512, jax.random.key(0),
                               num_replicates=128, upper_bound="csmc")  # fmt: skip
        inverse = np.exp(exact - est.extras["csmc_log_z"])
        assert abs(inverse.mean() - 1) < 4 * inverse.std(ddof=1) / np.sqrt(inverse.size)
        assert est.extras["upper_bound"] == "csmc"
        est = sp.log_partition(target, "smc", base, 512, jax.random.key(1), upper_bound="csmc")
        assert _sandwiches(est, exact, 3)
        proposal_eubo = sp.log_partition(target, "smc", base, 512, jax.random.key(1)).eubo
        assert est.eubo < proposal_eubo  # the conditional bound is the tighter one


@pytest.mark.slow
def test_smc_with_a_callable_proposal_is_calibrated_and_sandwiched_over_seeds():
    """30 seeds, a callable base as proposal, no twist and a learned twist: the 95% interval
    covers the exact log Z in ≥ 25 of 30, the sandwich ``[elbo − 2se, eubo + 2se]`` in ≥ 28."""
    base, dfa, target, exact = _bigram_target()
    twist, _ = sp.fit_twist(base, dfa, jax.random.key(99), steps=300, progress=False)
    for choice in (None, twist):
        covered = sandwiched = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", sp.EstimateWarning)
            for seed in range(30):
                est = sp.log_partition(target, "smc", base, 512, jax.random.key(seed),
                                       twist=choice, upper_bound="csmc")  # fmt: skip
                covered += est.interval[0] <= exact <= est.interval[1]
                sandwiched += _sandwiches(est, exact, 2)
        assert covered >= 25 and sandwiched >= 28, (choice, covered, sandwiched)


def _neural_under_a_regex():
    """``(random 1-layer Transformer ARM, regex DFA, its constrained EBM, exact log Z)``."""
    from flax import nnx
    from seqppl.models.transformer import TransformerARM

    space = sp.SequenceSpace(4, 6, eos=True)
    module = TransformerARM(space.num_actions, space.horizon, 1, 1, 8, 8, rngs=nnx.Rngs(3))
    neural = sp.ARM.from_nnx(module, space)
    dfa = sp.Lattice.regex(space, PATTERN, ["0", "1", "2", "3"])
    target = neural.constrain(dfa)
    return neural, dfa, target, float(target.log_partition())


def _neural_coverage(seeds, upper_bound="csmc", twists=("none", "learned")):
    """``{twist: (covered, sandwiched)}`` over ``seeds`` runs of SMC with the Transformer as
    proposal: no twist and its learned twist; intervals 95%, sandwich ± 2 se (the EUBO of
    ``upper_bound``)."""
    with jax.numpy_rank_promotion("allow"), warnings.catch_warnings():
        warnings.simplefilter("ignore", sp.EstimateWarning)
        neural, dfa, target, exact = _neural_under_a_regex()
        learned, _ = sp.fit_twist(neural, dfa, jax.random.key(99), steps=200, progress=False)
        out = {}
        for name in twists:
            twist = {"none": None, "learned": learned}[name]
            covered = sandwiched = 0
            for seed in seeds:
                est = sp.log_partition(target, "smc", neural, 512, jax.random.key(seed),
                                       twist=twist, upper_bound=upper_bound)  # fmt: skip
                covered += est.interval[0] <= exact <= est.interval[1]
                sandwiched += _sandwiches(est, exact, 2)
            out[name] = covered, sandwiched
    return out


def test_a_neural_proposal_under_a_regex_covers_the_exact_log_z():
    """Short version of the slow study: the learned twist, 2 seeds (the proposal's EUBO), every
    interval and sandwich covers (the untwisted Transformer proposal: test_partition.py)."""
    for name, (covered, sandwiched) in _neural_coverage(range(2), "eubo", ("learned",)).items():
        assert covered == 2 and sandwiched == 2, (name, covered, sandwiched)


@pytest.mark.slow
def test_a_neural_proposal_under_a_regex_is_calibrated_over_30_seeds():
    """SMC's 95% interval with a Transformer proposal, with and without a learned twist, covers
    the exact log Z (enumeration) in ≥ 25 of 30 seeds (a binomial false alarm of 1.6% at the
    nominal rate), the sandwich in ≥ 28."""
    for name, (covered, sandwiched) in _neural_coverage(range(100, 130)).items():
        assert covered >= 25 and sandwiched >= 28, (name, covered, sandwiched)


def test_bad_twist_input():
    base, dfa, target, _ = _bigram_target()
    other = sp.Lattice.regex(sp.SequenceSpace(4, 5, eos=True), PATTERN, ["0", "1", "2", "3"])
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="dfa"):
        sp.fit_twist(base, other, key)
    with pytest.raises(TypeError, match="base must be an ARM"):
        sp.fit_twist(target, dfa, key)
    with pytest.raises(TypeError, match="dfa must be a Lattice"):
        sp.fit_twist(base, "0*", key)
    with pytest.raises(ValueError, match="steps"):
        sp.fit_twist(base, dfa, key, steps=0)
    never = sp.Lattice.regex(base.space, "0{9}", ["0", "1", "2", "3"])
    with pytest.raises(ValueError, match="Z = 0"):
        sp.fit_twist(base, never, key)
    wrong = sp.TableTwist(jnp.zeros((3, dfa.num_states)), base, dfa)
    with pytest.raises(ValueError, match=r"twist.values has shape \(3, 3\)"):
        sp.log_partition(target, "smc", base, 64, key, twist=wrong)
    with pytest.raises(ValueError, match="approx"):
        sp.TableTwist.from_lattice(base, sp.ARM.from_table(sp.Lattice.markov(other.space, 0),
                                   jnp.zeros((1, 5))).constrain(other))  # fmt: skip
    with pytest.raises(ValueError, match="upper_bound must be one of"):
        sp.log_partition(target, "smc", base, 64, key, upper_bound="sandwich")
    with pytest.raises(ValueError, match="upper_bound='csmc' applies to method='smc'"):
        sp.log_partition(target, "is", base, 64, key, upper_bound="csmc")
