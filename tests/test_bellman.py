"""M, M⁻¹, soft values, path rewards and occupancies against the brute-force oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import seqppl as sp
from seqppl.bellman import SCHEDULES

from . import oracles
from .strategies import arm_tables, assert_close, lattices, problems, prompts, spaces, tolerance


def _sequences(lat):
    return oracles.all_sequences(lat.space.vocab_size, lat.space.length, lat.space.eos)


def _path_logits(q, lat, seqs, prompt):
    """q[t, s_t(y), :] for every sequence: [N, T, A]."""
    states = np.asarray(lat.states(seqs, prompt=prompt))
    return np.asarray(q)[np.arange(lat.space.horizon)[None, :], states]


@given(problems())
def test_log_z_and_arm_probabilities_match_oracle(problem):
    lat, r, prompt, dtype, scale = problem
    T = lat.space.horizon
    tol = tolerance(dtype, T, scale)
    q, values = sp.soft_bellman(lat, jnp.asarray(r))
    assert q.dtype == dtype and values.dtype == dtype
    assert q.shape == (T, lat.num_states, lat.space.num_actions)
    assert values.shape == (T, lat.num_states)
    assert not np.isnan(q).any() and not np.isnan(values).any()
    np.testing.assert_array_equal(values, sp.soft_values(lat, jnp.asarray(r)))
    start = int(lat.initial_state(prompt))
    log_z = oracles.log_z(r, lat, prompt)
    assert_close(values[0, start], log_z, tol, "log Z")
    if not np.isfinite(log_z):
        return
    seqs = _sequences(lat)
    rewards = np.array([oracles.sequence_reward(r, lat, y, prompt) for y in seqs])
    log_p = np.array([oracles.arm_log_prob(q, lat, y, prompt) for y in seqs])
    assert_close(log_p, rewards - log_z, tol, "log p_M(r) = R - log Z")
    path = sp.path_rewards(_path_logits(q, lat, seqs, prompt), seqs, lat.space)
    assert_close(np.asarray(path).sum(-1), rewards, tol, "path-wise M⁻¹ of M(r) sums to R")


@settings(max_examples=max(4, settings.default.max_examples // 2))  # compiles per shape
@given(problems(), st.booleans())
def test_parallel_in_time_dp_equals_the_sequential_scan(problem, homogeneous_reference):
    """The associative-scan DP gives the sequential scan's q, V and gradients (float64 1e-10,
    float32 1e-4, relative), the same −∞ pattern, with or without a reference measure."""
    lat, r, prompt, dtype, scale = problem
    r = jnp.asarray(r)
    actions = jnp.arange(lat.space.num_actions, dtype=dtype)
    shape = (lat.num_states, lat.space.num_actions)
    reference = jnp.broadcast_to(actions, shape) if homogeneous_reference else None
    rtol = 1e-10 if dtype == np.float64 else 1e-4
    sequential = sp.soft_bellman(lat, r, reference)
    parallel = sp.soft_bellman(lat, r, reference, method="parallel")
    for name, seq, par in zip(("q", "V"), sequential, parallel, strict=True):
        assert par.dtype == dtype and par.shape == seq.shape
        assert_close(
            par,
            seq,
            rtol * max(1.0, float(np.max(np.abs(seq), where=np.isfinite(seq), initial=0.0))),
            name,
        )
    start = lat.initial_state(prompt)

    def log_z(table, method):
        return sp.soft_values(lat, table, reference, method=method)[0, start]

    if np.isfinite(log_z(r, "sequential")):
        grads = [jax.grad(log_z)(r, method) for method in SCHEDULES]
        assert_close(grads[1], grads[0], rtol, "occupancy")
    with pytest.raises(ValueError, match="method must be one of"):
        sp.soft_values(lat, r, method="pallas")


@given(problems())
def test_inverse_of_m_gives_the_same_distribution(problem):
    lat, r, prompt, dtype, scale = problem
    tol = tolerance(dtype, lat.space.horizon, scale)
    q, values = sp.soft_bellman(lat, jnp.asarray(r))
    start = int(lat.initial_state(prompt))
    if not np.isfinite(values[0, start]):
        with pytest.raises(ValueError, match="no finite logit"):
            sp.inverse_soft_bellman(lat, q, prompt=prompt)
        return
    r_back = sp.inverse_soft_bellman(lat, q, prompt=prompt)
    assert r_back.dtype == dtype and not np.isnan(r_back).any()
    seqs = _sequences(lat)
    expected = [oracles.sequence_reward(r, lat, y, prompt) for y in seqs]
    got = [oracles.sequence_reward(r_back, lat, y, prompt) for y in seqs]
    assert_close(got, expected, tol, "R of M⁻¹(M(r))")
    # entries with a live successor come back exactly
    live = np.isfinite(q)
    full_r = np.broadcast_to(np.asarray(r), q.shape)
    assert_close(np.asarray(r_back)[live], full_r[live], tol, "M⁻¹(M(r)) = r on finite q")


@given(spaces(), st.data())
def test_m_of_inverse_is_identity_on_arm_tables(space, data):
    lat = data.draw(lattices(space))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    q, scale = data.draw(arm_tables(lat, dtype))
    prompt = data.draw(prompts(space))
    tol = tolerance(dtype, space.horizon, scale)
    r = sp.inverse_soft_bellman(lat, jnp.asarray(q), prompt=prompt)
    q_back, values = sp.soft_bellman(lat, r)
    masked = q.copy()
    if space.eos:
        masked[-1, :, : space.vocab_size] = -np.inf
    assert_close(q_back, masked, tol, "M(M⁻¹(q)) = q")
    start = int(lat.initial_state(prompt))
    assert_close(values[0, start], oracles.logsumexp_np(masked[0, start]), tol, "V_q(x) = A(x)")
    seqs = _sequences(lat)
    log_p = [oracles.arm_log_prob(q, lat, y, prompt) for y in seqs]
    rewards = np.array([oracles.sequence_reward(r, lat, y, prompt) for y in seqs])
    assert_close(rewards - float(values[0, start]), log_p, tol, "p_{R_r} = p_q")


@given(problems())
def test_gradient_of_log_z_is_the_occupancy(problem):
    lat, r, prompt, dtype, scale = problem
    occ = sp.occupancy(lat, jnp.asarray(r), prompt=prompt)
    assert occ.dtype == dtype and not np.isnan(occ).any()
    expected = oracles.occupancy(r, lat, prompt)
    assert_close(occ, expected, tolerance(dtype, lat.space.horizon, scale), "occupancy")
    start = lat.initial_state(prompt)
    grad = jax.grad(lambda t: sp.soft_values(lat, t)[0, start])(jnp.asarray(r))
    assert not np.isnan(grad).any()
    summed = expected.sum(0) if np.ndim(r) == 2 else expected
    assert_close(grad, summed, tolerance(dtype, lat.space.horizon, scale), "homogeneous grad")


@given(spaces(), st.data())
def test_prefix_tree_occupancy_is_the_prefix_marginal(space, data):
    lat = sp.Lattice.prefix_tree(space)
    r, scale = data.draw(
        __import__("tests.strategies", fromlist=["tables"]).tables(lat, np.float64)
    )
    occ = np.asarray(sp.occupancy(lat, jnp.asarray(r)))
    seqs = _sequences(lat)
    rewards = np.array([oracles.sequence_reward(r, lat, y) for y in seqs])
    log_z = oracles.logsumexp_np(rewards)
    if not np.isfinite(log_z):
        assert (occ == 0).all()
        return
    probs = np.exp(rewards - log_z)
    for t in range(space.horizon):
        for y in {tuple(y[: t + 1]) for y in seqs if oracles.response_length(y, space.eos_id) > t}:
            marginal = probs[(seqs[:, : t + 1] == np.array(y)).all(1)].sum()
            s = oracles.prefix_state(y[:t], space.vocab_size)
            assert abs(occ[t, s, y[t]] - marginal) <= tolerance(np.float64, space.horizon, scale)


@given(problems(dtype=np.float64), st.data())
def test_reference_measure_form(problem, data):
    lat, r, prompt, dtype, scale = problem
    ref, _ = data.draw(arm_tables(lat, dtype))
    tol = tolerance(dtype, lat.space.horizon, max(scale, 10.0))
    q_res, values = sp.soft_bellman(lat, jnp.asarray(r), reference=jnp.asarray(ref))
    seqs = _sequences(lat)
    log_ref = np.array([oracles.arm_log_prob(ref, lat, y, prompt) for y in seqs])
    rewards = np.array([oracles.sequence_reward(r, lat, y, prompt) for y in seqs])
    with np.errstate(invalid="ignore"):
        target = log_ref + rewards
    log_z = oracles.logsumexp_np(target)
    start = int(lat.initial_state(prompt))
    assert_close(values[0, start], log_z, tol, "log Z* = V_{q_ref + q}(x)")
    if not np.isfinite(log_z):
        return
    log_ref_table = np.asarray(sp.log_softmax(_masked(lat, ref), -1))
    full = np.asarray(q_res) + log_ref_table
    log_p = np.array([oracles.arm_log_prob(full, lat, y, prompt) for y in seqs])
    assert_close(log_p, target - log_z, tol, "p_{q_ref + q} = p*")
    r_back = sp.inverse_soft_bellman(lat, q_res, reference=jnp.asarray(ref), prompt=prompt)
    got = np.array([oracles.sequence_reward(r_back, lat, y, prompt) for y in seqs])
    expected = np.where(np.isneginf(log_ref), -np.inf, rewards)
    assert_close(got, expected, tol, "M⁻¹ with a reference")


def _masked(lat, table):
    table = np.array(np.broadcast_to(table, (lat.space.horizon, *np.shape(table)[-2:])))
    if lat.space.eos:
        table[-1, :, : lat.space.vocab_size] = -np.inf
    return jnp.asarray(table)


@given(spaces(), st.data())
def test_path_rewards_for_any_logits(space, data):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1)))
    batch = data.draw(st.sampled_from([(), (3,), (2, 2)]))
    logits = 5 * rng.standard_normal((*batch, space.horizon, space.num_actions))
    logits[rng.random(logits.shape) < 0.2] = -np.inf
    logits[..., 0] = np.where(np.isneginf(logits[..., 0]), 0.0, logits[..., 0])
    if space.eos:
        logits[..., -1, -1] = 0.0
    seqs = _sequences(sp.Lattice.markov(space, 0))
    y = seqs[rng.integers(0, len(seqs), size=batch)]
    r = np.asarray(sp.path_rewards(jnp.asarray(logits), jnp.asarray(y), space))
    assert r.shape == (*batch, space.horizon) and not np.isnan(r).any()
    flat_l = logits.reshape(-1, space.horizon, space.num_actions)
    flat_y = y.reshape(-1, space.horizon)
    flat_r = r.reshape(-1, space.horizon)
    for lg, yy, rr in zip(flat_l, flat_y, flat_r, strict=True):
        masked = lg.copy()
        if space.eos:
            masked[-1, : space.vocab_size] = -np.inf
        tau = oracles.response_length(yy, space.eos_id)
        log_p = sum(masked[t, yy[t]] - oracles.logsumexp_np(masked[t]) for t in range(tau))
        expected = log_p + oracles.logsumexp_np(masked[0])
        assert_close(
            rr.sum(), expected, tolerance(np.float64, space.horizon, 5.0), "Σ r = log p + V"
        )
        assert (rr[tau:] == 0).all()


def test_path_rewards_out_of_range_and_shapes():
    logits = jnp.zeros((2, 3))
    r = sp.path_rewards(logits, jnp.array([0, 7]))
    np.testing.assert_allclose(r[0], -np.log(3.0), rtol=1e-6)  # q = 0 minus V(next) = log 3
    assert np.isneginf(r[1])  # id 7 is outside [0, 3)
    with pytest.raises(ValueError, match="share T"):
        sp.path_rewards(logits, jnp.array([0, 1, 2]))
    space = sp.SequenceSpace(vocab_size=2, length=1, eos=True)
    with pytest.raises(ValueError, match="T=2, A=3"):
        sp.path_rewards(jnp.zeros((2, 4)), jnp.array([0, 2]), space)


def test_jit_vmap_and_grad_over_batches_of_tables():
    space = sp.SequenceSpace(vocab_size=3, length=3, eos=True)
    lat = sp.Lattice.markov(space, order=1)
    rng = np.random.default_rng(0)
    tables = rng.standard_normal((5, space.horizon, lat.num_states, space.num_actions))
    tables[:, :, 0, 1] = -np.inf
    batched_q, batched_v = jax.vmap(lambda t: sp.soft_bellman(lat, t))(jnp.asarray(tables))
    jitted = jax.jit(lambda t: sp.soft_bellman(lat, t))
    for i in range(5):
        q, v = jitted(jnp.asarray(tables[i]))
        np.testing.assert_allclose(batched_q[i], q, rtol=1e-12)
        np.testing.assert_allclose(batched_v[i], v, rtol=1e-12)
        assert_close(v[0, lat.initial], oracles.log_z(tables[i], lat), 1e-10, "vmap log Z")
    grads = jax.vmap(jax.grad(lambda t: sp.soft_values(lat, t)[0, lat.initial]))(
        jnp.asarray(tables)
    )
    assert not np.isnan(grads).any()
    np.testing.assert_allclose(grads.sum((2, 3))[:, 0], 1.0, rtol=1e-12)
    r_back = jax.jit(jax.vmap(lambda q: sp.inverse_soft_bellman(lat, q)))(batched_q)
    assert r_back.shape == tables.shape
    hess = jax.hessian(lambda t: sp.soft_values(lat, t)[0, lat.initial])(jnp.asarray(tables[0]))
    assert not np.isnan(hess).any()


def test_bad_tables_are_refused():
    space = sp.SequenceSpace(vocab_size=2, length=2, eos=True)
    lat = sp.Lattice.markov(space, order=1)
    with pytest.raises(ValueError, match=r"r must have shape \[3, 3\] or \[3, 3, 3\]"):
        sp.soft_values(lat, jnp.zeros((2, 3)))
    bad = np.zeros((3, 3))
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"r\[1, 2\] = nan"):
        sp.soft_bellman(lat, bad)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match=r"never NaN or \+∞"):
        sp.soft_values(lat, bad)
    with pytest.raises(ValueError, match="reference"):
        sp.soft_values(lat, np.zeros((3, 3)), reference=np.full((3, 3), np.nan))
    q = np.zeros((3, 3, 3))
    q[1, 0, :] = -np.inf  # state 0 (after token 0) reachable at t=1 and dead
    with pytest.raises(ValueError, match=r"q\[1, 0, :\] has no finite logit"):
        sp.inverse_soft_bellman(lat, q)
    q[0, lat.initial, 0] = -np.inf  # now state 0 is unreachable: the table is a distribution
    assert np.isfinite(sp.inverse_soft_bellman(lat, q)[0, lat.initial, 1])
    ints = sp.soft_values(lat, np.zeros((3, 3), dtype=np.int32))
    assert jnp.issubdtype(ints.dtype, jnp.floating)


KINDS = ["prefix_tree", "markov0", "markov1", "markov2", "markov3", "automaton", "product"]


def _lattice(kind, space):
    if kind == "prefix_tree":
        return sp.Lattice.prefix_tree(space)
    if kind.startswith("markov"):
        return sp.Lattice.markov(space, order=int(kind[-1]))
    mod3 = (np.arange(3)[:, None] + np.arange(space.vocab_size)[None, :]) % 3
    automaton = sp.Lattice.automaton(space, mod3, initial=1)
    return automaton if kind == "automaton" else sp.Lattice.markov(space, 1).product(automaton)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("eos", [False, True])
@pytest.mark.parametrize("prompt", [None, np.array([1, 0, 2])])
def test_every_lattice_kind_and_mode_against_the_oracle(kind, eos, prompt):
    """A fixed grid so that every kind × mode × prompt case runs, whatever hypothesis draws."""
    space = sp.SequenceSpace(vocab_size=3, length=3, eos=eos)
    lat = _lattice(kind, space)
    rng = np.random.default_rng(KINDS.index(kind))
    r = 3 * rng.standard_normal((space.horizon, lat.num_states, space.num_actions))
    r[rng.random(r.shape) < 0.3] = -np.inf
    tol = tolerance(np.float64, space.horizon, 3.0)
    q, values = sp.soft_bellman(lat, jnp.asarray(r))
    start = int(lat.initial_state(prompt))
    log_z = oracles.log_z(r, lat, prompt)
    assert np.isfinite(log_z)
    assert_close(values[0, start], log_z, tol, "log Z")
    seqs = _sequences(lat)
    rewards = np.array([oracles.sequence_reward(r, lat, y, prompt) for y in seqs])
    log_p = np.array([oracles.arm_log_prob(q, lat, y, prompt) for y in seqs])
    assert_close(log_p, rewards - log_z, tol, "log p")
    r_back = sp.inverse_soft_bellman(lat, q, prompt=prompt)
    back = np.array([oracles.sequence_reward(r_back, lat, y, prompt) for y in seqs])
    assert_close(back, rewards, tol, "M⁻¹∘M")
    occ = sp.occupancy(lat, jnp.asarray(r), prompt=prompt)
    assert_close(occ, oracles.occupancy(r, lat, prompt), tol, "occupancy")


def test_review_regressions_padding_vmap_nan_and_shapes():
    space = sp.SequenceSpace(2, 2, eos=True)
    lat = sp.Lattice.markov(space, 1)
    zeros = jnp.zeros((3, 3))
    # a non-EOS token after EOS, or an id outside [0, A), is out of the support: −∞
    assert np.isneginf(lat.path_scores(zeros, jnp.array([2, 7, 2])).sum())
    assert np.isneginf(sp.path_rewards(zeros, jnp.array([2, 0, 2]), space).sum())
    assert lat.path_scores(zeros, jnp.array([2, 2, 2])).sum() == 0
    # vmap over prompts with a concrete table
    q = np.zeros((3, 3, 3))
    out = jax.vmap(lambda x: sp.inverse_soft_bellman(lat, q, prompt=x))(jnp.array([[1], [0]]))
    assert out.shape == (2, 3, 3, 3) and not np.isnan(out).any()
    # a NaN smuggled past validation (traced) shows up as NaN, in values and gradients
    fixed = sp.Lattice.markov(sp.SequenceSpace(2, 2), 1)
    bad = jnp.zeros((3, 2)).at[fixed.initial, 0].set(jnp.nan)
    log_z = jax.jit(lambda t: sp.soft_values(fixed, t)[0, fixed.initial])
    assert np.isnan(log_z(bad)) and np.isnan(jax.grad(log_z)(bad)).any()
    # shapes and sizes are refused with a message, not clamped or crashed
    with pytest.raises(ValueError, match="table must have shape"):
        lat.path_scores(jnp.zeros((4, 3)), jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="integer dtype"):
        lat.states(np.array([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="last dimension T=3"):
        lat.states(np.array([0, 1]))
    with pytest.raises(ValueError, match="more than 2\\^30 cells"):
        sp.Lattice.markov(sp.SequenceSpace(4, 3), 14)
    with pytest.raises(ValueError, match="MAX_PREFIX_TREE_CELLS"):
        sp.Lattice.prefix_tree(sp.SequenceSpace(2, 30000))
    states = lat.states(np.array([0, 1, 2]), prompt=np.array([[0], [1]]))
    np.testing.assert_array_equal(states, [[0, 0, 1], [1, 0, 1]])


@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("eos", [False, True])
def test_homogeneous_dp_is_exact_where_exponentiating_once_underflows(scale, eos):
    """A homogeneous table runs in exp space (one exponential of the table, then products);
    with rewards of scale 1e3 its terms underflow and the DP must fall back to log space: both
    equal a float64 NumPy log-space scan (V = 100, T = 64, Markov(1), Markov(2), an automaton)."""
    space = sp.SequenceSpace(12, 40, eos=eos)
    rng = np.random.default_rng(int(scale) + eos)
    delta = rng.integers(0, 30, size=(30, space.vocab_size))
    for lat in (
        sp.Lattice.markov(space, 1),
        sp.Lattice.markov(space, 2),
        sp.Lattice.automaton(space, delta),
    ):
        r = scale * rng.standard_normal((lat.num_states, space.num_actions))
        r[rng.random(r.shape) < 0.1] = -np.inf
        if eos:
            r[:, space.eos_id] = np.where(np.isinf(r[:, space.eos_id]), 0.0, r[:, space.eos_id])
        expected = oracles.backward_values_np(
            r, np.where(np.arange(space.num_actions) == space.eos_id, 0, lat.delta),
            space.horizon, space.eos_id,
        )  # fmt: skip
        got = np.asarray(sp.bellman.root_values(lat, r))
        assert_close(got, expected, tolerance(np.float64, space.horizon, scale), lat.kind)
        np.testing.assert_allclose(sp.soft_values(lat, r)[0], got, rtol=1e-12)


def test_gradient_of_the_exp_space_pass_is_the_occupancy():
    """The exp-space pass of a homogeneous table (well scaled: no fallback) differentiates to
    the occupancy summed over decisions, computed by the log-space pass of the [T, S, A] copy."""
    space = sp.SequenceSpace(5, 6, eos=True)
    lat = sp.Lattice.markov(space, 1)
    r = np.random.default_rng(1).standard_normal((lat.num_states, space.num_actions))
    grad = jax.grad(lambda t: sp.bellman.root_values(lat, t)[lat.initial])(jnp.asarray(r))
    occupancy = sp.occupancy(lat, r).sum(0)
    np.testing.assert_allclose(grad, occupancy, rtol=1e-10, atol=1e-12)
    assert np.isfinite(grad).all()
