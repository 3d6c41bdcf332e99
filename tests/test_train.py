"""fit: exact-risk and minibatch likelihood training, schedules, checkpoints, resume, Ctrl-C."""

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import seqppl as sp
from seqppl import loop, progress, train

from . import oracles
from .strategies import arm_tables, assert_close, spaces, tolerance

SPACE = sp.SequenceSpace(vocab_size=2, length=3, eos=False)  # 8 sequences
TREE = sp.Lattice.prefix_tree(SPACE)
LOG_RHO = jax.nn.log_softmax(jnp.asarray(np.random.default_rng(0).standard_normal(8)) * 1.5)
ENTROPY = float(-(jnp.exp(LOG_RHO) * LOG_RHO).sum())


def _tabular(kind):
    table = jnp.zeros((SPACE.horizon, TREE.num_states, SPACE.num_actions))
    return sp.ARM.from_table(TREE, table) if kind == "arm" else sp.EBM.from_table(TREE, table)


@pytest.mark.parametrize("kind", ["arm", "ebm"])
def test_exact_risk_training_reaches_the_entropy(kind):
    trained, history = train.fit(
        _tabular(kind),
        target=LOG_RHO,
        steps=400,
        key=jax.random.key(0),
        learning_rate=0.1,
        progress=False,
    )
    risk = float(train.exact_risk(trained, LOG_RHO))
    rounding = 64 * np.finfo(np.float64).eps * ENTROPY  # risk ≥ H(ρ) up to summation order
    assert -rounding <= risk - ENTROPY < 1e-3, risk - ENTROPY
    assert history["loss"][0] > history["loss"][-1] and history["step"][-1] == 399


def test_exact_risk_matches_enumeration():
    arm = sp.ARM.from_table(TREE, jnp.asarray(np.random.default_rng(1).standard_normal((3, 7, 2))))
    seqs = jnp.asarray(SPACE.enumerate())
    expected = -float((jnp.exp(LOG_RHO) * arm.log_prob(seqs)).sum())
    np.testing.assert_allclose(train.exact_risk(arm, LOG_RHO), expected, rtol=1e-12)
    np.testing.assert_allclose(train.exact_risk(sp.to_ebm(arm), LOG_RHO), expected, rtol=1e-10)


@settings(deadline=None)
@given(data=st.data())
def test_prefix_risk_of_a_callable_arm_matches_enumeration(data):
    """The per-prefix risk of a callable ARM on a fixed-length space (``prefix_weights``) equals
    the brute-force ``−Σ_y ρ(y) log p(y)``, with −∞ logits and −∞ target entries."""
    space = data.draw(spaces().filter(lambda s: not s.eos), label="space")
    dtype = data.draw(st.sampled_from([np.float32, np.float64]), label="dtype")
    tree = sp.Lattice.prefix_tree(space)
    table, scale = data.draw(arm_tables(tree, dtype), label="logits")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    seqs = oracles.all_sequences(space.vocab_size, space.length, eos=False)
    logits = rng.standard_normal(len(seqs)) * data.draw(st.sampled_from([1.0, 30.0]))
    logits[rng.random(len(seqs)) < data.draw(st.sampled_from([0.0, 0.5]))] = -np.inf
    if np.all(np.isneginf(logits)):
        logits[0] = 0.0
    log_rho = (logits - oracles.logsumexp_np(logits)).astype(dtype)
    delta = jnp.asarray(tree.delta)

    def logits_fn(q, y):  # the table row of each prefix, walked in jnp (y may be traced)
        states = [jnp.zeros(y.shape[:-1], jnp.int32)]
        for t in range(space.horizon - 1):
            states.append(delta[states[-1], y[..., t]])
        return q[jnp.arange(space.horizon), jnp.stack(states, -1)]

    arm = sp.ARM(logits_fn, space, params=jnp.asarray(table))
    log_p = np.array([oracles.arm_log_prob(table, tree, y) for y in seqs])
    mass = np.exp(log_rho.astype(np.float64))
    expected = -np.sum(np.where(mass > 0, mass * np.where(mass > 0, log_p, 0.0), 0.0))
    if np.any((mass > 0) & np.isneginf(log_p)):
        expected = np.inf
    risk = float(train.exact_risk(arm, jnp.asarray(log_rho)))
    tol = tolerance(dtype, space.horizon, scale) * max(
        1.0, abs(expected) if np.isfinite(expected) else 1.0
    )
    assert_close(risk, expected, tol, "prefix risk")
    weights = np.asarray(train.prefix_weights(jnp.asarray(mass), space))
    expected_weights = np.zeros_like(weights)
    for p, parent in enumerate(seqs[:: space.vocab_size]):
        for t in range(space.horizon):
            if not parent[t : space.horizon - 1].any():  # the first parent with this prefix
                for a in range(space.vocab_size):
                    starts = np.all(seqs[:, : t + 1] == [*parent[:t], a], axis=1)
                    expected_weights[p, t, a] = mass[starts].sum()
    np.testing.assert_allclose(weights, expected_weights, rtol=1e-12, atol=1e-300)


def test_minibatch_training_fits_the_data():
    truth = sp.ARM.from_table(
        TREE, jnp.asarray(np.random.default_rng(2).standard_normal((3, 7, 2)))
    )
    data = truth.sample(jax.random.key(1), (2000,))
    trained, history = train.fit(
        _tabular("arm"),
        data,
        steps=300,
        batch_size=128,
        key=jax.random.key(2),
        learning_rate=0.1,
        progress=False,
    )
    nll = -float(trained.log_prob(data).mean())
    counts = np.unique(np.asarray(data), axis=0, return_counts=True)[1]
    empirical_entropy = -float(np.sum(counts / 2000 * np.log(counts / 2000)))
    assert nll - empirical_entropy < 0.01
    assert len(history["step"]) == 31


def test_trapezoid_schedule():
    schedule = train.trapezoid_schedule(1e-2, 1000, warmup=100, decay=100)
    values = np.array([schedule(i) for i in (0, 50, 100, 500, 900, 950, 1000)])
    np.testing.assert_allclose(values, [0, 5e-3, 1e-2, 1e-2, 1e-2, 5e-3, 0], atol=1e-9)


def _run(tmp_path, interrupt_at=None):
    kwargs = dict(
        target=LOG_RHO,
        steps=60,
        key=jax.random.key(0),
        checkpoint_dir=tmp_path,
        checkpoint_every=20,
        progress=False,
    )
    if interrupt_at is None:
        return train.fit(_tabular("arm"), **kwargs)

    real = progress.tqdm

    class Interrupting(real):  # Ctrl-C arrives right after step ``interrupt_at`` finishes
        done = 0

        def update(self, n=1):
            super().update(n)
            Interrupting.done += n
            if Interrupting.done == interrupt_at:
                raise KeyboardInterrupt

    with mock.patch.object(progress, "tqdm", Interrupting), pytest.raises(KeyboardInterrupt):
        train.fit(_tabular("arm"), **kwargs)


def test_interrupt_then_resume_is_bit_identical(tmp_path):
    straight, history = _run(tmp_path / "straight")
    _run(tmp_path / "resumed", interrupt_at=33)  # Ctrl-C after step 33: checkpoint at 33
    state = loop.load_checkpoint(tmp_path / "resumed" / loop.CHECKPOINT_NAME, None)
    assert state["step"] == 33 and state["history"]["step"][-1] == 30
    resumed, resumed_history = _run(tmp_path / "resumed")
    np.testing.assert_array_equal(np.asarray(resumed.params), np.asarray(straight.params))
    for name in ("step", "loss"):  # ("seconds" is wall time)
        np.testing.assert_array_equal(resumed_history[name], history[name])


def test_corrupted_checkpoint_is_refused_and_the_previous_kept(tmp_path):
    _run(tmp_path)
    path = tmp_path / train.CHECKPOINT_NAME
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    with pytest.raises(ValueError, match="corrupted or truncated"):
        _run(tmp_path)
    assert path.with_suffix(".prev").exists()
    other = sp.ARM.from_table(TREE, jnp.zeros((3, 7, 2)))
    path.with_suffix(".prev").replace(path)
    with pytest.raises(ValueError, match="another run"):
        train.fit(
            other,
            target=LOG_RHO,
            steps=61,
            key=jax.random.key(0),
            checkpoint_dir=tmp_path,
            progress=False,
        )


def test_a_checkpoint_of_another_run_of_the_same_shapes_is_refused_naming_what_differs(tmp_path):
    """Regression: the fingerprint covered shapes only, so another target, other initial
    parameters or another learning rate resumed a foreign checkpoint silently."""
    kwargs = dict(steps=8, key=jax.random.key(0), checkpoint_dir=tmp_path, progress=False)
    arm = _tabular("arm")
    train.fit(arm, target=LOG_RHO, **kwargs)
    other_target = jnp.log(jax.nn.softmax(jnp.arange(LOG_RHO.size, dtype=float)))
    changes = {
        "target": dict(dist=arm, target=other_target),
        "initial parameters": dict(dist=arm.with_params(arm.params + 0.1), target=LOG_RHO),
        "optimizer": dict(dist=arm, target=LOG_RHO, learning_rate=3e-2),
        "key": dict(dist=arm, target=LOG_RHO, key=jax.random.key(1)),
    }
    for name, change in changes.items():
        options = {**kwargs, **change}
        with pytest.raises(loop.CheckpointError, match=rf"\({name} differ\)"):
            train.fit(options.pop("dist"), **options)
    resumed, _ = train.fit(arm, target=LOG_RHO, **kwargs)  # the same run resumes (finished)
    assert resumed.params.shape == arm.params.shape


def test_keys_of_both_kinds_are_accepted_and_others_refused():
    arm = _tabular("arm")
    legacy, _ = train.fit(arm, target=LOG_RHO, steps=3, key=jax.random.PRNGKey(0), progress=False)
    typed, _ = train.fit(arm, target=LOG_RHO, steps=3, key=jax.random.key(0), progress=False)
    np.testing.assert_array_equal(legacy.params, typed.params)
    for bad in (0, np.zeros(2), jax.random.split(jax.random.key(0), 2)):
        with pytest.raises(TypeError, match="key must be one PRNG key"):
            train.fit(arm, target=LOG_RHO, steps=1, key=bad, progress=False)


def test_bad_arguments():
    arm = _tabular("arm")
    with pytest.raises(ValueError, match="learning_rate must be a number"):
        train.fit(arm, target=LOG_RHO, steps=1, key=jax.random.key(0), learning_rate=np.nan)
    with pytest.raises(ValueError, match="exactly one"):
        train.fit(arm, steps=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="steps"):
        train.fit(arm, target=LOG_RHO, steps=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="data must be"):
        train.fit(arm, jnp.zeros((4, 2), int), steps=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="target must"):
        train.exact_risk(arm, jnp.zeros(3))
    with pytest.raises(TypeError, match="ARM or an EBM"):
        train.fit("arm", target=LOG_RHO, steps=1, key=jax.random.key(0))


def test_proposition_2_optimal_arm_is_m_of_optimal_ebm():
    """Tabular (prefix-tree) ARM and EBM trained on the same exact risk: q* = M(r*) up to a
    constant per state (docs/theory.md#optimality-of-teacher-forcing), on every reachable state."""
    arm, _ = train.fit(
        _tabular("arm"),
        target=LOG_RHO,
        steps=1500,
        key=jax.random.key(0),
        learning_rate=0.1,
        progress=False,
    )
    ebm, _ = train.fit(
        _tabular("ebm"),
        target=LOG_RHO,
        steps=1500,
        key=jax.random.key(0),
        learning_rate=0.1,
        progress=False,
    )
    q_star = np.asarray(arm.params)
    m_r, _ = sp.soft_bellman(TREE, ebm.params)
    gap = q_star - np.asarray(m_r)
    reachable = np.asarray(sp.occupancy(TREE, m_r)).sum(-1) > 0  # [T, S]
    spread = (gap.max(-1) - gap.min(-1))[reachable]  # 0 iff equal up to a per-state constant
    assert spread.max() < 1e-3, spread.max()
    # and the optimum is ρ itself (function-space optimality of teacher forcing)
    seqs = jnp.asarray(SPACE.enumerate())
    np.testing.assert_allclose(arm.log_prob(seqs), LOG_RHO, atol=2e-2)


def test_importance_sampled_ebm_objective_approaches_the_exact_fit():
    truth = sp.ARM.from_table(
        TREE, jnp.asarray(np.random.default_rng(3).standard_normal((3, 7, 2)))
    )
    data = truth.sample(jax.random.key(4), (3000,))
    kwargs = dict(
        steps=300, batch_size=256, key=jax.random.key(5), learning_rate=0.05, progress=False
    )
    exact, _ = train.fit(_tabular("ebm"), data, **kwargs)
    uniform = sp.ARM.from_table(TREE, jnp.zeros((3, 7, 2)))
    approx, history = train.fit(
        _tabular("ebm"), data, log_partition="is", proposal=uniform, num_samples=512, **kwargs
    )
    seqs = jnp.asarray(SPACE.enumerate())
    p_exact, p_approx = np.exp(exact.log_prob(seqs)), np.exp(approx.log_prob(seqs))
    tv = 0.5 * np.abs(p_exact - p_approx).sum()
    assert tv < 0.03, tv
    with pytest.raises(ValueError, match="proposal"):
        train.fit(_tabular("ebm"), data, log_partition="is", **kwargs)
    huge = sp.EBM(lambda y: jnp.zeros(y.shape[:-1]), sp.SequenceSpace(50, 8), params=jnp.zeros(()))
    with pytest.raises(ValueError, match="log_partition='is'"):
        train.fit(huge, jnp.zeros((3, 8), int), **kwargs)
