"""ARM and EBM: normalisation, sampling (χ²), shapes, pytrees, conversions, bad input."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import pytest
from hypothesis import given
from hypothesis import strategies as st
from numpyro.infer.util import log_density
from scipy import stats
from seqppl.models.tasks import digit_sum_task

import seqppl as sp

from . import oracles
from .strategies import arm_tables, assert_close, lattices, problems, spaces, tolerance

SPACES = [sp.SequenceSpace(3, 3, eos=True), sp.SequenceSpace(2, 4, eos=False)]
CHI2_ALPHA = 1e-3  # false-alarm rate of each goodness-of-fit test (fixed seeds: reproducible)


def _gru_like_logits(tokens, prompt=None):
    """A causal non-table logits function: a running sum of embeddings (reads y[:t] only)."""
    num_actions = 4
    emb = jnp.sin(jnp.arange(num_actions * num_actions, dtype=float).reshape(num_actions, -1))
    shifted = jnp.concatenate([jnp.zeros_like(tokens[..., :1]), tokens[..., :-1] + 1], axis=-1)
    h = jnp.cumsum(emb[jnp.clip(shifted, 0, num_actions - 1)], axis=-2)
    return 2.0 * jnp.tanh(h)


def _distributions(space):
    """Lattice ARM, callable ARM, lattice EBM, callable EBM and composites over ``space``."""
    rng = np.random.default_rng(0)
    lat = sp.Lattice.markov(space, 1)
    q = rng.standard_normal((space.horizon, lat.num_states, space.num_actions))
    arm = sp.ARM.from_table(lat, q)
    parity = sp.Lattice.automaton(
        space,
        [[0, 1] * 2][0][: space.vocab_size]
        and np.array([[(s + a) % 2 for a in range(space.vocab_size)] for s in range(2)]),
    )
    out = {
        "arm_table": arm,
        "ebm_table": sp.EBM.from_table(
            lat, 2 * rng.standard_normal((lat.num_states, space.num_actions))
        ),
        "ebm_fn": sp.EBM(lambda y: -0.7 * (y == 1).sum(-1).astype(float), space),
        "tilt_fn": arm.tilt(lambda y: (y == 0).sum(-1).astype(float), scale=0.8),
        "tilt_constrained": arm.tilt(
            sp.EBM.from_table(lat, jnp.zeros((lat.num_states, space.num_actions)))
        ).constrain(parity, [0]),
        "product_tempered": (
            sp.to_ebm(arm) * sp.EBM(lambda y: 0.3 * y.sum(-1).astype(float), space)
        ).tempered(0.5),
    }
    if space.num_actions == 4:
        out["arm_callable"] = sp.ARM(_gru_like_logits, space)
    return out


CASES = [(i, name) for i, s in enumerate(SPACES) for name in _distributions(s)]


@given(problems())
def test_table_ebm_log_prob_matches_the_oracle(problem):
    """R(y) − log Z against enumeration, −∞ masks, scales up to 1e3, float32 and float64."""
    lat, r, prompt, dtype, scale = problem
    ebm = sp.EBM.from_table(lat, r, prompt)
    seqs = oracles.all_sequences(lat.space.vocab_size, lat.space.length, lat.space.eos)
    rewards = np.array([oracles.sequence_reward(r, lat, y, prompt) for y in seqs])
    log_z = oracles.logsumexp_np(rewards)
    expected = rewards - log_z if np.isfinite(log_z) else np.full(len(seqs), -np.inf)
    log_p = ebm.log_prob(jnp.asarray(seqs))
    assert log_p.dtype == dtype
    assert_close(log_p, expected, 4 * tolerance(dtype, lat.space.horizon, scale), "log_prob")
    assert_close(
        ebm.unnormalized_log_prob(jnp.asarray(seqs)),
        rewards,
        tolerance(dtype, lat.space.horizon, scale),
    )


@given(st.data())
def test_table_arm_log_prob_and_entropy_match_the_oracle(data):
    space = data.draw(spaces())
    lat = data.draw(lattices(space))
    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    q, scale = data.draw(arm_tables(lat, dtype))
    if data.draw(st.booleans()):  # a homogeneous [S, A] table (the fast log_prob path)
        q = q[0].copy()
        if space.eos:
            q[:, space.eos_id] = np.where(np.isneginf(q[:, space.eos_id]), 0.0, q[:, space.eos_id])
    arm = sp.ARM.from_table(lat, q)
    seqs = oracles.all_sequences(space.vocab_size, space.length, space.eos)
    expected = np.array([oracles.arm_log_prob(q, lat, y) for y in seqs])
    log_p = arm.log_prob(jnp.asarray(seqs))
    assert log_p.dtype == dtype
    tol = tolerance(dtype, space.horizon, scale)
    assert_close(log_p, expected, tol, "log_prob")
    assert abs(oracles.logsumexp_np(expected)) < tol  # the oracle's own normalisation
    p = np.exp(expected)
    entropy = -np.sum(np.where(p > 0, p * np.where(p > 0, expected, 0), 0))
    assert abs(float(arm.entropy()) - entropy) <= tol * max(1.0, scale)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"space{c[0]}-{c[1]}")
def test_normalised_and_samples_match_probabilities(case):
    space = SPACES[case[0]]
    d = _distributions(space)[case[1]]
    seqs = jnp.asarray(space.enumerate())
    log_p = np.asarray(d.log_prob(seqs), np.float64)
    assert not np.isnan(log_p).any()
    assert abs(oracles.logsumexp_np(log_p)) <= 1e-9, "probabilities must sum to 1"
    n = 4000
    y = np.asarray(d.sample(jax.random.key(7), (n,)))
    assert y.shape == (n, space.horizon)
    space.validate(y)
    index = {tuple(s): i for i, s in enumerate(np.asarray(seqs))}
    counts = np.bincount([index[tuple(row)] for row in y], minlength=len(seqs))
    p = np.exp(log_p)
    assert counts[p == 0].sum() == 0, "sampled a sequence of probability 0"
    keep = p > 0
    expected = n * p[keep]
    c = counts[keep]
    # pool the cells expected below 5 draws into one, so that the χ² approximation holds
    small = expected < 5
    e = np.append(expected[~small], expected[small].sum())
    c = np.append(c[~small], c[small].sum())
    e, c = e[e > 0], c[e > 0]
    chi2 = ((c - e) ** 2 / e).sum()
    assert stats.chi2.sf(chi2, max(len(e) - 1, 1)) > CHI2_ALPHA


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"space{c[0]}-{c[1]}")
def test_numpyro_log_density_is_the_same_for_both_forms(case):
    space = SPACES[case[0]]
    d = _distributions(space)[case[1]]
    twin = sp.to_ebm(d) if isinstance(d, sp.ARM) else sp.to_arm(d)
    y = jnp.asarray(space.enumerate())

    def model(site):
        numpyro.sample("y", site, obs=y)

    a, _ = log_density(model, (d,), {}, {})
    b, _ = log_density(model, (twin,), {}, {})
    assert np.isfinite(a) or np.isneginf(a)
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-9)
    lp_a, lp_b = np.asarray(d.log_prob(y)), np.asarray(twin.log_prob(y))
    assert np.array_equal(np.isneginf(lp_a), np.isneginf(lp_b))
    finite = np.isfinite(lp_a)
    np.testing.assert_allclose(lp_a[finite], lp_b[finite], atol=1e-9)


def test_expand_intermediates_and_enumerated_support():
    """What the case table of tests/test_families.py does not cover: NumPyro's ``expand``,
    ``sample_with_intermediates`` and ``enumerate_support`` on a batched ARM."""
    space = sp.SequenceSpace(3, 3, eos=True)
    lat = sp.Lattice.markov(space, 2)
    q = np.random.default_rng(1).standard_normal((lat.num_states, space.num_actions))
    arm = sp.ARM.from_table(lat, q, prompt=np.array([[0, 1], [2, 2]]))
    y, (steps,) = arm.sample_with_intermediates(jax.random.key(3), (5,))
    np.testing.assert_allclose(steps.sum(-1), arm.log_prob(y), rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(arm.log_prob(y, [steps]), steps.sum(-1))
    expanded = arm.expand((4, 2))
    assert expanded.sample(jax.random.key(1)).shape == (4, 2, space.horizon)
    assert arm.enumerate_support().shape == (space.num_sequences, 2, space.horizon)
    assert arm.enumerate_support(expand=False).shape == (space.num_sequences, 1, space.horizon)


def _chi2_pvalue(log_p, draws, seqs):
    """Goodness of fit of ``draws`` to ``exp(log_p)`` over ``seqs`` (cells below 5 pooled)."""
    index = {tuple(s): i for i, s in enumerate(np.asarray(seqs))}
    counts = np.bincount([index[tuple(row)] for row in np.asarray(draws)], minlength=len(seqs))
    expected = len(draws) * np.exp(np.asarray(log_p))
    small = expected < 5
    e = np.append(expected[~small], expected[small].sum())
    c = np.append(counts[~small], counts[small].sum())
    return stats.chi2.sf(((c - e) ** 2 / np.maximum(e, 1e-300)).sum(), len(e) - 1)


def test_batched_tables_behave_like_each_entry():
    """Tables ``[*B, T, S, A]`` (with a prompt batch broadcast against B): every method equals
    the unbatched distribution of each entry."""
    space = SPACES[0]
    lat = sp.Lattice.markov(space, 1)
    T, S, A = space.horizon, lat.num_states, space.num_actions
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, T, S, A))
    r = rng.standard_normal((1, 2, T, S, A))
    prompts = np.array([[[0]], [[1]], [[1]]])  # [3, 1, 1]: batch (3, 2) with q and with r
    seqs = jnp.asarray(space.enumerate())
    arm = sp.ARM.from_table(lat, q, prompt=prompts)
    ebm = sp.EBM.from_table(lat, r, prompt=prompts)
    tilt = sp.ARM.from_table(lat, q).tilt(sp.EBM.from_table(lat, r[0]), scale=0.7)
    assert arm.batch_shape == (3, 2) and ebm.batch_shape == (3, 2) and tilt.batch_shape == (2,)

    def arm_entry(i, j):
        return sp.ARM.from_table(lat, q[j], prompt=prompts[i, 0])

    def ebm_entry(i, j):
        return sp.EBM.from_table(lat, r[0, j], prompt=prompts[i, 0])

    for d, entry in [
        (arm, arm_entry),
        (sp.to_ebm(arm), arm_entry),
        (ebm, ebm_entry),
        (sp.to_arm(ebm), ebm_entry),
    ]:
        assert d.batch_shape == (3, 2)
        lp = d.log_prob(seqs[:, None, None, :])
        assert lp.shape == (len(seqs), 3, 2)
        for i, j in [(0, 0), (2, 1)]:  # entries with different prompts and tables
            np.testing.assert_allclose(lp[:, i, j], entry(i, j).log_prob(seqs), atol=1e-9)
        if isinstance(d, sp.ARM):
            entropy = -(np.exp(lp) * np.nan_to_num(lp, neginf=0)).sum(0)
            np.testing.assert_allclose(d.entropy(), entropy, rtol=1e-9)
    for j in range(2):
        single = sp.ARM.from_table(lat, q[j]).tilt(sp.EBM.from_table(lat, r[0, j]), scale=0.7)
        np.testing.assert_allclose(tilt.log_partition()[j], single.log_partition(), rtol=1e-10)
    draws = sp.to_arm(tilt).sample(jax.random.key(4), (3000,))
    assert draws.shape == (3000, 2, T)
    log_p = tilt.log_prob(seqs[:, None, :])
    for j in range(2):
        assert _chi2_pvalue(log_p[:, j], draws[:, j], seqs) > CHI2_ALPHA
    with pytest.raises(ValueError, match=r"\[\*batch, "):
        sp.ARM.from_table(lat, q[:, :1])  # a batch needs the time axis


def test_vmap_and_grad_over_parameters_and_the_tilt_scale():
    """Jit and pytree round trips of every family are in tests/test_families.py; here vmap over
    a table ARM's parameters and vmap/grad over a tilt's β (data, not a closure)."""
    space = sp.SequenceSpace(3, 3, eos=True)
    task = digit_sum_task(space, 3)
    y = jnp.asarray(space.enumerate())
    arm = sp.to_arm(sp.EBM.from_table(task.lattice, task.rewards))
    tables = jnp.stack([arm.params, arm.params + 1.0])
    batched = jax.vmap(lambda t: arm.with_params(t).log_prob(y))(tables)
    np.testing.assert_allclose(batched[0], batched[1], atol=1e-10)  # shift-invariant logits
    scales = jnp.array([0.5, 1.0, 2.0])
    bigram = sp.ARM.from_table(sp.Lattice.markov(space, 1), task.bigram_logits)
    reward = sp.EBM(lambda v: (v == 0).sum(-1).astype(float), space)
    log_z = jax.vmap(lambda b: bigram.tilt(reward, b).log_partition())(scales)
    grad = jax.grad(lambda b: bigram.tilt(reward, b).log_partition())(1.0)
    tilted = bigram.tilt(reward, 1.0)
    p = np.exp(tilted.log_prob(y))
    np.testing.assert_allclose(
        grad, (p * np.asarray(reward.unnormalized_log_prob(y))).sum(), rtol=1e-8
    )
    assert log_z.shape == (3,) and np.all(np.diff(log_z) > 0)


def test_out_of_support_scores_neg_inf_and_warns_with_validate_args():
    space = sp.SequenceSpace(3, 2, eos=True)
    lat = sp.Lattice.markov(space, 1)
    q = jnp.zeros((lat.num_states, space.num_actions))
    bad = jnp.array([[0, 7, 3], [3, 1, 3], [0, 1, 2], [0, 3, 3]])
    quiet = {"validate_args": False}  # NumPyro validates by default; the warning is tested below
    for d in [
        sp.ARM.from_table(lat, q, **quiet),
        sp.ARM(lambda y: jnp.zeros(y.shape + (4,)), space, **quiet),
        sp.EBM.from_table(lat, q, **quiet),
        sp.EBM(lambda y: jnp.zeros(y.shape[:-1]), space, **quiet),
    ]:
        lp = np.asarray(d.log_prob(bad))
        assert np.isneginf(lp[:3]).all() and np.isfinite(lp[3])
        with pytest.raises(ValueError, match="last dimension T=3"):  # a shape error, not −∞
            d.log_prob(jnp.array([0, 3]))
    with pytest.warns(UserWarning, match="Out-of-support"):
        sp.ARM.from_table(lat, q, validate_args=True).log_prob(bad)


def test_bad_input_is_refused():
    space = sp.SequenceSpace(3, 2, eos=True)
    lat = sp.Lattice.markov(space, 1)
    with pytest.raises(ValueError, match=r"prompt\[1\] = 3"):
        sp.ARM.from_table(lat, jnp.zeros((4, 4)), prompt=[0, 3])
    with pytest.raises(ValueError, match=r"q\[0, 1\] = nan"):
        sp.ARM.from_table(lat, jnp.zeros((4, 4)).at[0, 1].set(jnp.nan))
    with pytest.raises(ValueError, match="no finite logit"):
        sp.ARM.from_table(lat, jnp.zeros((4, 4)).at[:, :].set(-jnp.inf))
    with pytest.raises(ValueError, match="NaN or"):
        sp.EBM(lambda y: jnp.full(y.shape[:-1], jnp.nan), space).log_partition()
    with pytest.raises(ValueError, match="NaN or"):
        sp.EBM(lambda y: jnp.full(y.shape[:-1], jnp.inf), space).unnormalized_log_prob(
            jnp.array([3, 3, 3])
        )
    with pytest.raises(ValueError, match="must return shape"):
        sp.EBM(lambda y: jnp.zeros(y.shape), space).unnormalized_log_prob(jnp.array([3, 3, 3]))
    with pytest.raises(TypeError, match="logits_fn must be callable"):
        sp.ARM(3, space)
    with pytest.raises(ValueError, match="is over"):
        sp.EBM.from_table(lat, jnp.zeros((4, 4))) * sp.EBM(
            lambda y: y.sum(-1), sp.SequenceSpace(2, 2)
        )
    big = sp.SequenceSpace(50, 20)
    huge = sp.EBM(lambda y: jnp.zeros(y.shape[:-1]), big)
    with pytest.raises(ValueError, match=r"sp.log_partition\(ebm, method='is' or 'smc'"):
        huge.log_partition()
    with pytest.raises(ValueError, match="sp.distill"):
        sp.to_arm(huge)
    with pytest.raises(ValueError, match="approximate samplers|sp.distill"):
        huge.sample(jax.random.key(0))
    estimated = huge.with_log_partition(3.5)
    assert estimated.log_partition_source == "estimate" and float(estimated.log_partition()) == 3.5


def test_latent_sequence_site_under_nuts_fails_with_numpyros_error():
    space = sp.SequenceSpace(2, 2)
    arm = sp.ARM.from_table(sp.Lattice.markov(space, 0), jnp.zeros((1, 2)))

    def model():
        numpyro.sample("y", arm)

    kernel = numpyro.infer.NUTS(model)
    mcmc = numpyro.infer.MCMC(kernel, num_warmup=2, num_samples=2, progress_bar=False)
    with pytest.raises(Exception, match="enumerate support|continuous"):
        mcmc.run(jax.random.key(0))


class _CachedGruLike:
    """The same model as ``_gru_like_logits`` with the cached-step protocol (O(T) sampling)."""

    def __call__(self, tokens, prompt=None):
        return _gru_like_logits(tokens)

    def _emb(self):
        return jnp.sin(jnp.arange(16, dtype=float).reshape(4, 4))

    def init(self, batch_shape, prompt=None):
        h = jnp.broadcast_to(self._emb()[0], (*batch_shape, 4))
        return 2.0 * jnp.tanh(h), h

    def step(self, h, token):
        h = h + self._emb()[jnp.clip(token + 1, 0, 3)]
        return 2.0 * jnp.tanh(h), h


def test_cached_step_protocol_samples_like_reevaluation():
    space = SPACES[0]
    cached = sp.ARM(_CachedGruLike(), space)
    plain = sp.ARM(_gru_like_logits, space)
    y_c, (lp_c,) = cached.sample_with_intermediates(jax.random.key(11), (64,))
    y_p, (lp_p,) = plain.sample_with_intermediates(jax.random.key(11), (64,))
    np.testing.assert_array_equal(y_c, y_p)
    np.testing.assert_allclose(lp_c, lp_p, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(lp_c.sum(-1), plain.log_prob(y_c), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("cdf", ["matmul", "cumsum"])
def test_inverse_cdf_draws_match_the_row_and_never_zero_mass(dtype, scale, cdf):
    """Both cumulative forms: the sampler's triangular matmul and a table ARM's cumsum."""
    from seqppl.distributions.ancestral import cumulative_probs, inverse_cdf

    rng = np.random.default_rng(int(scale))
    logits = rng.standard_normal((3, 6)) * (1.0 if scale == 1.0 else 0.0)
    logits[:, [1, 4]] = -np.inf  # hard-masked actions
    logits[2, 5] = scale  # an extreme logit: the row is (nearly) deterministic
    log_p = sp.log_softmax(jnp.asarray(logits, dtype), -1)
    n = 20_000
    cumulative = cumulative_probs(log_p) if cdf == "matmul" else jnp.cumsum(jnp.exp(log_p), -1)
    rows = [jnp.broadcast_to(x, (n, 3, 6)) for x in (log_p, cumulative)]
    draws = np.asarray(inverse_cdf(jax.random.key(3), *rows))
    assert not np.isin(draws, [1, 4]).any()
    for row in range(3):
        counts = np.bincount(draws[:, row], minlength=6)
        p = np.exp(np.asarray(log_p[row], np.float64))
        keep = p * n >= 5
        e, c = n * p[keep], counts[keep]
        if len(e) > 1:
            assert stats.chi2.sf(((c - e) ** 2 / e).sum(), len(e) - 1) > CHI2_ALPHA
        assert counts[~keep].sum() <= max(20, 4 * n * p[~keep].sum())


@pytest.mark.parametrize("eos", [False, True])
def test_homogeneous_tables_are_never_copied_per_decision(eos):
    """log_prob and sampling from an [S, A] table: no array of the compiled programs has T·S·A
    entries or more (no [T, S, A] copy, however reshaped)."""
    space = sp.SequenceSpace(6, 10, eos=eos)  # T = 10 or 11
    lat = sp.Lattice.markov(space, 2)  # S = 49
    q = np.random.default_rng(2).standard_normal((lat.num_states, space.num_actions))
    arm = sp.ARM.from_table(lat, q)
    y = arm.sample(jax.random.key(0), (13,))
    cells = space.horizon * lat.num_states * space.num_actions
    for name, fn, args in (
        ("log_prob", lambda d, y: d.log_prob(y), (arm, y)),
        ("sample", lambda d, k: d.sample(k, (13,)), (arm, jax.random.key(1))),
    ):
        text = jax.jit(fn).lower(*args).compile().as_text()
        sizes = [
            int(np.prod([int(d) for d in dims.split(",") if d]))
            for dims in re.findall(r"\b[fsu](?:32|64|8|16)\[([0-9,]*)\]", text)
        ]
        assert sizes and max(sizes) < cells, (name, max(sizes), cells)


@given(spaces(), st.data())
def test_arm_constrain_has_the_log_probability_of_the_constraint(space, data):
    """Oracle: ``arm.constrain(dfa, F).log_partition() = log Σ_{y accepted} p_q(y)`` by
    enumeration, its samples' law is p_q given acceptance, and ``to_ebm(arm, normalized=True)``
    has ``log Z = 0``; the M⁻¹ EBM's constrained ``log Z`` is not the probability (regression:
    ``to_ebm(arm).constrain`` was the only route and read 1.39 where log P was −0.83)."""
    from .strategies import automata

    dtype = data.draw(st.sampled_from([np.float32, np.float64]))
    lat = sp.Lattice.markov(space, 1)
    q, _ = data.draw(arm_tables(lat, dtype))
    dfa = data.draw(automata(space))
    accepting = data.draw(st.lists(st.integers(0, dfa.num_states - 1), min_size=1, unique=True))
    arm = sp.ARM.from_table(lat, jnp.asarray(q))
    ys = oracles.all_sequences(space.vocab_size, space.length, space.eos)
    log_p = np.array([oracles.arm_log_prob(q, lat, y) for y in ys], np.float64)
    words = [[a for a in y if a != space.eos_id] for y in ys]  # the tokens before EOS
    final = [oracles.walk(dfa.delta, dfa.initial, [*w, 0])[-1] for w in words]
    accepted = np.isin(final, accepting)
    expected = oracles.logsumexp_np(log_p[accepted]) if accepted.any() else -np.inf
    tol = tolerance(dtype, space.horizon, 10.0)
    constrained = arm.constrain(dfa, accepting)
    assert_close(float(constrained.log_partition()), expected, tol, "log P(constraint)")
    assert_close(float(sp.to_ebm(arm, normalized=True).log_partition()), 0.0, tol, "log Z")
    if np.isfinite(expected):
        conditioned = np.asarray(sp.to_arm(constrained).log_prob(jnp.asarray(ys)), np.float64)
        want = np.where(accepted, log_p - expected, -np.inf)
        np.testing.assert_allclose(np.exp(conditioned), np.exp(want), atol=tol)
        raw = float(sp.to_ebm(arm).constrain(dfa, accepting).log_partition())
        shift = float(sp.to_ebm(arm).log_partition())  # V_q(x): what the M⁻¹ route adds
        assert_close(raw - shift, expected, tol * 4, "M⁻¹ route minus its root value")
