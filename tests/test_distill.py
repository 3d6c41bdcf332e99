"""Distillation: the error report against brute-force enumeration, its Monte Carlo intervals
against exact values, and the objectives of ``sp.distill`` against exact KLs."""

from __future__ import annotations

from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import seqppl as sp
from seqppl import distillation_report, loop, objectives, progress
from seqppl.distill import DistillationStopped
from tests import oracles
from tests.strategies import arm_tables, lattices, problems, tolerance

SPACE = sp.SequenceSpace(3, 3, eos=True)


def _target_and_student(seed=0, space=SPACE, temperature=1.0):
    """A random Markov(1) target and a random Markov(1) student (finite rewards)."""
    lat = sp.Lattice.markov(space, 1)
    shape = (space.horizon, lat.num_states, space.num_actions)
    r = jax.random.normal(jax.random.key(seed), shape) * temperature
    q = jax.random.normal(jax.random.key(seed + 1), shape[1:])
    return sp.EBM.from_table(lat, r), sp.ARM.from_table(lat, q)


def _tabular_student(space=SPACE):
    tree = sp.Lattice.prefix_tree(space)
    return sp.ARM.from_table(tree, jnp.zeros((space.horizon, tree.num_states, space.num_actions)))


# -- the report -------------------------------------------------------------------------------


@settings(deadline=None)
@given(data=st.data(), problem=problems())
def test_exact_report_matches_enumeration(data, problem):
    lat, r, prompt, dtype, scale = problem
    assume(np.isfinite(oracles.log_z(r, lat, prompt)))
    lat_q = data.draw(lattices(lat.space))
    q, q_scale = data.draw(arm_tables(lat_q, dtype))
    ebm = sp.EBM.from_table(lat, r, prompt)
    arm = sp.ARM.from_table(lat_q, q, prompt)
    report = sp.distillation_error(ebm, arm)
    expected = oracles.distillation_errors(r, lat, q, lat_q, prompt)
    tol = 100 * tolerance(dtype, lat.space.horizon, max(scale, q_scale))

    def close(actual, wanted, what):
        actual, wanted = np.asarray(actual, np.float64), np.asarray(wanted, np.float64)
        assert np.array_equal(np.isinf(actual), np.isinf(wanted)), (what, actual, wanted)
        finite = np.isfinite(wanted)
        err = np.abs(actual[finite] - wanted[finite])
        assert np.all(err <= tol * np.maximum(1, np.abs(wanted[finite]))), (what, actual, wanted)

    for name in ("kl_reverse", "kl_forward", "tv", "per_position_kl", "logit_error"):
        close(getattr(report, name), expected[name], name)
    assert report.bound == 2 * lat.space.horizon * report.logit_error
    # the chain rule and Proposition 3's bound
    close(report.per_position_kl.sum(), report.kl_reverse, "chain rule")
    slack = tol * max(1.0, report.bound if np.isfinite(report.bound) else 1.0)
    assert report.kl_reverse <= report.bound + slack
    assert report.kl_forward <= report.bound + slack
    assert report.kl_reverse_interval == (report.kl_reverse, report.kl_reverse)


def test_exact_report_of_the_exact_arm_is_zero_and_callable_targets_agree():
    ebm, arm = _target_and_student(3)
    perfect = sp.distillation_error(ebm, sp.to_arm(ebm))
    assert abs(perfect.kl_reverse) < 1e-12 and abs(perfect.kl_forward) < 1e-12
    assert perfect.logit_error < 1e-12 and perfect.tv < 1e-12
    callable_target = sp.EBM(lambda y: ebm.unnormalized_log_prob(y), SPACE)  # prefix-tree M
    a, b = sp.distillation_error(ebm, arm), sp.distillation_error(callable_target, arm)
    for name in ("kl_reverse", "kl_forward", "tv", "logit_error"):
        assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-10, abs=1e-12)
    np.testing.assert_allclose(a.per_position_kl, b.per_position_kl, atol=1e-12)


def test_infinite_kls_and_their_epsilon():
    """A student with mass where the target has none: reverse KL and ε infinite, forward finite."""
    lat = sp.Lattice.markov(SPACE, 0)
    r = jnp.zeros((SPACE.horizon, 1, SPACE.num_actions)).at[0, 0, 1].set(-jnp.inf)
    ebm = sp.EBM.from_table(lat, r)
    report = sp.distillation_error(ebm, sp.ARM.from_table(lat, jnp.zeros((1, 4))))
    assert report.kl_reverse == np.inf and report.logit_error == np.inf
    assert np.isfinite(report.kl_forward) and report.per_position_kl[0] == np.inf
    assert report.kl_reverse_interval == (np.inf, np.inf)


def test_monte_carlo_intervals_cover_the_exact_kls():
    """Reduced coverage study (the slow one runs 100 seeds): 95% intervals, 20 seeds."""
    _coverage(seeds=20, min_hits=16)


@pytest.mark.slow
def test_monte_carlo_coverage_full():
    _coverage(seeds=100, min_hits=88)


def _coverage(seeds, min_hits):
    ebm, arm = _target_and_student(5)
    exact = sp.distillation_error(ebm, arm)
    routes = {
        "chain rule + EUBO": {},
        "ELBO + self-normalised": {"no_teacher": True, "target_samples": None},
    }
    for route, options in routes.items():
        hits = np.zeros(2)
        for seed in range(seeds):
            report = _mc_report(ebm, arm, seed, **options)
            for i, name in enumerate(("kl_reverse", "kl_forward")):
                low, high = getattr(report, f"{name}_interval")
                hits[i] += low <= getattr(exact, name) <= high
        assert np.all(hits >= min_hits), (route, hits, seeds)


def _mc_report(ebm, arm, seed, no_teacher=False, target_samples="auto", num_samples=2000):
    key = jax.random.key(seed)
    if not no_teacher:
        return sp.distillation_error(
            ebm, arm, "mc", key=key, num_samples=num_samples, target_samples=target_samples
        )
    with mock.patch.object(distillation_report, "no_exact_arm_reason", lambda e: "(test)"):
        return sp.distillation_error(
            ebm, arm, "mc", key=key, num_samples=num_samples, target_samples=target_samples
        )


def test_monte_carlo_report_fields_and_export(tmp_path):
    ebm, arm = _target_and_student(7)
    exact = sp.distillation_error(ebm, arm)
    report = sp.distillation_error(ebm, arm, "mc", key=jax.random.key(0), num_samples=4000)
    assert report.tv is None and report.method == "mc"
    se = report.per_position_kl_stderr
    assert np.all(np.abs(report.per_position_kl - exact.per_position_kl) <= 5 * se + 1e-12)
    assert report.logit_error <= exact.logit_error + 1e-12  # visited states: a lower estimate
    assert "lower estimate" in report.logit_error_scope
    tree = report.to_datatree()
    assert tree["per_position"]["kl"].shape == (SPACE.horizon,)
    tree.to_netcdf(tmp_path / "report.nc", engine="h5netcdf")
    assert "KL(student" in str(report)
    import matplotlib

    matplotlib.use("Agg")
    assert report.plot() is not None


def test_monte_carlo_report_on_a_space_too_large_to_enumerate():
    """V=6, L=12 with EOS: 2.6e9 sequences; lattice target, so the chain rule applies, and the
    exact report runs as a dynamic program (table student); its KL is inside the Monte Carlo
    report's interval region (5 standard errors)."""
    space = sp.SequenceSpace(6, 12, eos=True)
    ebm, arm = _target_and_student(11, space)
    exact = sp.distillation_error(ebm, arm)
    assert exact.tv is None and "dynamic programming" in exact.notes[0]
    report = sp.distillation_error(ebm, arm, "mc", key=jax.random.key(1), num_samples=512)
    assert np.isfinite(report.kl_reverse) and report.kl_reverse > 0
    assert abs(report.kl_reverse - exact.kl_reverse) <= 5 * report.kl_reverse_stderr + 1e-6
    assert report.per_position_kl.shape == (space.horizon,)
    assert report.kl_reverse <= report.bound
    callable_student = sp.ARM(lambda y: arm.logits(y), space)
    with pytest.raises(ValueError, match="method='mc'"):
        sp.distillation_error(ebm, callable_student)


def test_report_refuses_bad_input():
    ebm, arm = _target_and_student(0)
    other = sp.ARM.from_table(
        sp.Lattice.markov(sp.SequenceSpace(2, 3, eos=True), 0), jnp.zeros((1, 3))
    )
    with pytest.raises(ValueError, match="arm is over"):
        sp.distillation_error(ebm, other)
    with pytest.raises(TypeError, match="ebm must be an EBM"):
        sp.distillation_error(arm, arm)
    with pytest.raises(ValueError, match="method must be"):
        sp.distillation_error(ebm, arm, "bogus")
    with pytest.raises(TypeError, match="key="):
        sp.distillation_error(ebm, arm, "mc")
    with pytest.raises(ValueError, match="level"):
        sp.distillation_error(ebm, arm, level=95)


# -- the objectives ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "objective, options, goal",
    [
        ("exact", {}, 1e-6),
        ("reverse_kl", {}, 1e-3),
        ("reverse_kl", {"estimator": "score_function"}, 1e-2),
        ("forward_kl", {}, 1e-2),
        ("forward_kl", {"proposal": "frozen"}, 1e-2),
        ("soft_bellman", {}, 1e-2),
    ],
)
def test_objectives_reach_the_target(objective, options, goal):
    """1,500 steps on V=3, L=3 (EOS) with a prefix-tree student that can represent the target."""
    ebm, _ = _target_and_student(0)
    student, history = sp.distill(
        ebm,
        _tabular_student(),
        objective,
        steps=1500,
        key=jax.random.key(1),
        learning_rate=0.1,
        log_every=500,
        progress=False,
        **options,
    )
    report = sp.distillation_error(ebm, student)
    kl = report.kl_forward if objective in ("exact", "forward_kl") else report.kl_reverse
    assert kl <= goal, (objective, report.kl_reverse, report.kl_forward)
    assert history["kl_reverse"][-1] == pytest.approx(report.kl_reverse, rel=0.05)  # pre-update
    assert history["kl_reverse"][0] > 100 * history["kl_reverse"][-1]
    assert np.all(history["kl_reverse"] <= history["bound"] + 1e-9)
    if objective == "forward_kl":
        assert np.all(history["ess"] > 0) and "khat" in history
    if options.get("proposal") == "frozen":
        assert history["proposal_swapped"].sum() >= 1


def test_soft_bellman_needs_local_rewards():
    ebm, _ = _target_and_student(0)
    callable_target = sp.EBM(lambda y: ebm.unnormalized_log_prob(y), SPACE)
    with pytest.raises(ValueError, match="'reverse_kl' or 'forward_kl' or 'exact'"):
        sp.distill(callable_target, _tabular_student(), "soft_bellman", key=jax.random.key(0))


def test_distill_refuses_bad_input():
    ebm, arm = _target_and_student(0)
    other = sp.ARM.from_table(
        sp.Lattice.markov(sp.SequenceSpace(2, 3, eos=True), 0), jnp.zeros((1, 3))
    )
    with pytest.raises(ValueError, match="student is over"):
        sp.distill(ebm, other, key=jax.random.key(0))
    with pytest.raises(ValueError, match="objective must be one of"):
        sp.distill(ebm, arm, "kl", key=jax.random.key(0))
    with pytest.raises(ValueError, match="steps must be"):
        sp.distill(ebm, arm, steps=0, key=jax.random.key(0))
    with pytest.raises(TypeError, match="key must be"):
        sp.distill(ebm, arm, key=0)
    with pytest.raises(ValueError, match="estimator must be"):
        sp.distill(ebm, arm, estimator="magic", key=jax.random.key(0))
    with pytest.raises(ValueError, match="proposal must be"):
        sp.distill(ebm, arm, "forward_kl", proposal="stale", key=jax.random.key(0))


def test_non_finite_loss_stops_with_last_good_params_checkpoint_and_history(tmp_path):
    """Logits sqrt(0.95 − p) turn NaN once p > 0.95; the optimiser adds 0.1 to p each step."""
    ebm, _ = _target_and_student(0)

    def logits_fn(p, tokens):
        row = jnp.sqrt(0.95 - p) * jnp.arange(SPACE.num_actions, dtype=p.dtype)
        return jnp.broadcast_to(row, (*tokens.shape, SPACE.num_actions))

    student = sp.ARM(logits_fn, SPACE, params=jnp.asarray(0.0))
    drift = optax.GradientTransformation(
        lambda params: optax.EmptyState(),
        lambda grads, state, params=None: (jax.tree.map(lambda g: 0 * g + 0.1, grads), state),
    )
    with pytest.warns(DistillationStopped, match="loss is nan at step 10"):
        trained, history = sp.distill(
            ebm,
            student,
            steps=50,
            key=jax.random.key(0),
            optimizer=drift,
            log_every=1,
            checkpoint_dir=tmp_path,
            checkpoint_every=4,
            evaluate=None,
            progress=False,
        )
    assert float(trained.params) == pytest.approx(0.9)
    assert list(history["step"]) == list(range(9))  # step 9 is redone on resume
    assert "step 9" in history["stop_reason"]
    state = loop.load_checkpoint(tmp_path / loop.CHECKPOINT_NAME, None)
    assert state["step"] == 9 and float(state["params"]) == pytest.approx(0.9)


# -- several students -------------------------------------------------------------------------


def test_distillation_posterior_and_student_summary(tmp_path):
    from seqppl.student_posterior import distillation_posterior, student_summary

    ebm, _ = _target_and_student(2)
    lat = sp.Lattice.markov(SPACE, 1)
    reports = {}
    for name, scale in (("close", 0.1), ("far", 1.0)):
        reports[name] = []
        for seed in range(4):
            table = sp.to_arm(ebm).params + scale * jax.random.normal(
                jax.random.key(seed), (SPACE.horizon, lat.num_states, SPACE.num_actions)
            )
            student = sp.ARM.from_table(lat, table)
            report = sp.distillation_error(ebm, student, "mc", key=jax.random.key(seed))
            reports[name].append(report)
    tree = distillation_posterior(reports)
    assert tree["posterior"]["kl_reverse"].shape == (1, 4, 2)
    summary = student_summary(tree)
    kl = np.array([[r.kl_reverse for r in reports[n]] for n in ("close", "far")])
    se = np.array([[r.kl_reverse_stderr for r in reports[n]] for n in ("close", "far")])
    np.testing.assert_allclose(summary["mean"], kl.mean(1))
    np.testing.assert_allclose(summary["sd"], kl.std(1, ddof=1))
    np.testing.assert_allclose(summary["mc_sd"], np.sqrt((se**2).mean(1)))
    expected = np.sqrt(np.maximum(0, kl.std(1, ddof=1) ** 2 - (se**2).mean(1)))
    np.testing.assert_allclose(summary["between_sd"], expected)
    assert summary.loc["far", "mean"] > summary.loc["close", "mean"]
    tree.to_netcdf(tmp_path / "students.nc", engine="h5netcdf")
    with pytest.raises(ValueError, match="same number"):
        distillation_posterior({"a": reports["close"], "b": reports["far"][:2]})
    with pytest.raises(ValueError, match="metric must be"):
        student_summary(tree, "tv")


def test_interrupted_distillation_resumes_bit_identically(tmp_path):
    """Ctrl-C after step 30 of 60 (frozen-proposal forward KL: the carry is checkpointed too)."""
    ebm, _ = _target_and_student(4)
    options = dict(
        objective="forward_kl",
        proposal="frozen",
        steps=60,
        key=jax.random.key(3),
        learning_rate=0.1,
        log_every=10,
        evaluate=None,
        checkpoint_every=10,
        progress=False,
    )
    straight, history = sp.distill(ebm, _tabular_student(), **options)

    class Interrupting(progress.tqdm):
        done = 0

        def update(self, n=1):
            super().update(n)
            Interrupting.done += n
            if Interrupting.done == 30:
                raise KeyboardInterrupt

    with mock.patch.object(progress, "tqdm", Interrupting), pytest.raises(KeyboardInterrupt):
        sp.distill(ebm, _tabular_student(), checkpoint_dir=tmp_path, **options)
    resumed, resumed_history = sp.distill(
        ebm, _tabular_student(), checkpoint_dir=tmp_path, **options
    )
    np.testing.assert_array_equal(np.asarray(resumed.params), np.asarray(straight.params))
    for name in ("step", "loss", "khat", "proposal_swapped"):
        np.testing.assert_array_equal(resumed_history[name], history[name])


@pytest.mark.parametrize(
    "objective, options, exact_objective",
    [
        ("forward_kl", {"proposal": "student"}, "exact"),
        ("reverse_kl", {"estimator": "score_function"}, "reverse_kl"),
    ],
)
def test_sampled_gradients_are_unbiased(objective, options, exact_objective):
    """The mean over 16 steps of 4,096 draws matches the exact gradient (Adam would hide a
    constant factor, so the objectives' own gradients are compared)."""
    ebm, _ = _target_and_student(6)
    student = _tabular_student().with_params(
        0.5 * jax.random.normal(jax.random.key(9), _tabular_student().params.shape)
    )
    key = jax.random.key(10)
    loss = objectives.objective_loss(
        ebm,
        student,
        objective,
        key,
        4096,
        options.get("estimator", "auto"),
        options.get("proposal", "student"),
    )[0]
    exact = objectives.objective_loss(ebm, student, exact_objective, key, 2, "auto", "student")[0]
    grad = jax.jit(jax.grad(lambda p, step: loss(p, step, None)[0]))
    sampled = np.mean([np.asarray(grad(student.params, step)) for step in range(16)], 0)
    wanted = np.asarray(jax.grad(lambda p: exact(p, 0, None)[0])(student.params))
    cosine = np.sum(sampled * wanted) / np.linalg.norm(sampled) / np.linalg.norm(wanted)
    assert cosine > 0.98, cosine
    assert np.linalg.norm(sampled) / np.linalg.norm(wanted) == pytest.approx(1.0, abs=0.08)


def test_nan_is_refused_naming_the_argument():
    ebm, arm = _target_and_student(0)
    nan_student = arm.with_params(arm.params.at[0, 1].set(jnp.nan))
    for method, extra in (("exact", {}), ("mc", {"key": jax.random.key(0)})):
        with pytest.raises(ValueError, match=r"arm\.log_prob\(y\) = nan on the sequence"):
            sp.distillation_error(ebm, nan_student, method, **extra)
    nan_reward = sp.EBM(lambda y: jnp.where(y[..., 0] == 1, jnp.nan, 0.0), SPACE)
    with pytest.raises(ValueError, match="nan"):
        sp.distillation_error(nan_reward, arm)
    gap = distillation_report.half_range_gap(jnp.array([0.0, jnp.nan, -1.0]), jnp.zeros(3))
    assert np.isnan(gap)


def test_stopping_on_khat_keeps_history_consistent_across_resume(tmp_path):
    """A peaked fixed proposal: ESS below 10% of the draws at two logged steps in a row stops
    the run; the stopping step's row is dropped, so resuming does not log it twice."""
    ebm, _ = _target_and_student(0)
    lat = sp.Lattice.markov(SPACE, 1)
    peaked = sp.ARM.from_table(lat, 4 * jax.random.normal(jax.random.key(5), (4, 4)))
    options = dict(
        objective="forward_kl",
        proposal=peaked,
        steps=20,
        key=jax.random.key(0),
        log_every=1,
        min_ess_fraction=0.1,
        patience=2,
        evaluate=None,
        checkpoint_dir=tmp_path,
        progress=False,
    )
    for _ in range(2):
        with pytest.warns(DistillationStopped, match="ESS fell below 25.6"):
            _, history = sp.distill(ebm, _tabular_student(), **options)
        assert list(history["step"]) == [0]


@settings(max_examples=max(4, settings.default.max_examples // 2))
@given(problems(dtype=np.float64), st.data())
def test_dynamic_program_report_equals_enumeration(problem, data):
    """Oracle: the exact report's dynamic program (used where the space is too large to
    enumerate) gives the enumerated KLs, per-position KL and ε, on the same lattice and on two
    different lattices (their product); a target's masked entries give an infinite KL."""
    lat, table, prompt, dtype, scale = problem
    ebm = sp.EBM.from_table(lat, jnp.asarray(table))
    assume(np.isfinite(float(ebm.log_partition())))
    other = data.draw(lattices(lat.space))
    q, _ = data.draw(arm_tables(other, dtype))
    for student in (sp.ARM.from_table(other, jnp.asarray(q)), sp.to_arm(ebm.tempered(0.5))):
        enumerated = sp.distillation_error(ebm, student, "exact")
        with mock.patch.object(distillation_report, "MAX_ENUMERATE", 0):
            dynamic = sp.distillation_error(ebm, student, "exact")
        tol = tolerance(dtype, lat.space.horizon, scale) * 16
        for name in ("kl_reverse", "kl_forward", "logit_error"):
            want, got = getattr(enumerated, name), getattr(dynamic, name)
            assert (want == got == np.inf) or abs(want - got) <= tol * max(1, abs(want)), name
        finite = np.isfinite(enumerated.per_position_kl)
        np.testing.assert_allclose(
            dynamic.per_position_kl[finite], enumerated.per_position_kl[finite], atol=tol
        )
        assert dynamic.tv is None and "dynamic programming" in dynamic.notes[0]
