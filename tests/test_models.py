"""The model zoo: Transformer ARM/EBM, n-gram and GRU ARMs as seqppl distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from seqppl.models.gru import GRU
from seqppl.models.ngram import NGram, exact_arm
from seqppl.models.transformer import TransformerARM, TransformerEBM

import seqppl as sp
from seqppl.train import CheckpointError

from . import oracles


@pytest.fixture(autouse=True)
def allow_rank_promotion():
    """Flax layers add biases by NumPy rank promotion, which the suite otherwise forbids."""
    with jax.numpy_rank_promotion("allow"):
        yield


def _count(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize(
    "sizes, expected", [((2, 2, 16, 16), 3_633), ((3, 4, 64, 64), 76_609)], ids=["n2", "n3"]
)
def test_transformer_ebm_parameter_counts_match_the_paper(sizes, expected):
    layers, heads, dim, mlp = sizes
    ebm = TransformerEBM(8, 5, layers, heads, dim, mlp, rngs=nnx.Rngs(0))  # V = 8, T = 4
    assert _count(ebm) == expected


SPACE = sp.SequenceSpace(vocab_size=3, length=4, eos=True)  # A = 4, T = 5
PROMPT = jnp.array([[0, 2], [1, 1]])


def _models(dtype=jnp.float64):
    A, T = SPACE.num_actions, SPACE.horizon
    return {
        "transformer": TransformerARM(A, T + 2, 2, 2, 8, 8, rngs=nnx.Rngs(1), dtype=dtype),
        "gru": GRU(A, 8, rngs=nnx.Rngs(2)),
        "ngram": NGram(SPACE, 2, rngs=nnx.Rngs(3), init_scale=1.0),
    }


@pytest.mark.parametrize("name", ["transformer", "gru", "ngram"])
def test_log_prob_equals_cached_step_probabilities_and_sums_to_one(name):
    module = _models()[name]
    arm = sp.ARM.from_nnx(module, SPACE, PROMPT)
    y, (steps,) = arm.sample_with_intermediates(jax.random.key(0), (40,))  # cached decoding
    tol = 1e-9 if name == "transformer" else 1e-5  # GRU and n-gram parameters are float32
    np.testing.assert_allclose(arm.log_prob(y), steps.sum(-1), rtol=tol, atol=tol)
    seqs = jnp.asarray(SPACE.enumerate())[:, None, :]
    log_p = arm.log_prob(seqs)
    np.testing.assert_allclose(jax.scipy.special.logsumexp(log_p, 0), 0.0, atol=tol)
    # cached and uncached (re-evaluation) sampling: the same sequences for the same key
    plain = sp.ARM(lambda t, prompt: module(t, prompt=prompt), SPACE, PROMPT)
    np.testing.assert_array_equal(plain.sample(jax.random.key(0), (40,)), y)


def test_transformer_is_causal():
    module = _models()["transformer"]
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.integers(0, 3, size=(6, SPACE.horizon)))
    base = module(y)
    for t in range(SPACE.horizon):
        changed = y.at[:, t].set((y[:, t] + 1) % 3)
        logits = module(changed)
        np.testing.assert_array_equal(logits[:, : t + 1], base[:, : t + 1])
        assert not np.allclose(logits[:, t + 1 :], base[:, t + 1 :]) or t == SPACE.horizon - 1


def _dot_products(jaxpr):
    """Every ``dot_general`` equation of a closed jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn)
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else [value]:
                if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):  # a Jaxpr or ClosedJaxpr
                    found += _dot_products(getattr(sub, "jaxpr", sub))
    return found


def test_bf16_matmuls_accumulate_in_float32():
    """``matmul_dtype=bfloat16``: every forward product reads bf16 and accumulates in float32,
    parameters and gradients stay float32, logits are within a few bf16 rounding units
    (u = 2⁻⁸) of the float32 model's, and cached decoding (a bf16 key/value cache) matches
    ``log_prob``."""
    seed = 0
    space = sp.SequenceSpace(vocab_size=5, length=6, eos=False)
    sizes = (2, 2, 16, 16)
    exact = TransformerARM(5, 6, *sizes, rngs=nnx.Rngs(seed))
    mixed = TransformerARM(5, 6, *sizes, rngs=nnx.Rngs(seed), matmul_dtype=jnp.bfloat16)
    arm = sp.ARM.from_nnx(mixed, space)
    y, (steps,) = arm.sample_with_intermediates(jax.random.key(seed), (64,))
    unit = 2.0**-8
    reference, logits = exact(y), mixed(y)
    assert logits.dtype == jnp.float32
    assert np.max(np.abs(logits - reference)) <= 8 * unit * np.max(np.abs(reference))
    np.testing.assert_allclose(arm.log_prob(y), steps.sum(-1), rtol=1e-5)
    ebm = TransformerEBM(5, 7, *sizes, rngs=nnx.Rngs(seed), matmul_dtype=jnp.bfloat16)
    reward = TransformerEBM(5, 7, *sizes, rngs=nnx.Rngs(seed))(y)
    assert np.max(np.abs(ebm(y) - reward)) <= 8 * unit * np.max(np.abs(reward))
    for dist in (arm, sp.EBM.from_nnx(ebm, space)):
        loss = lambda p, d=dist: -d.with_params(p).log_prob(y).mean()  # noqa: E731
        products = _dot_products(jax.make_jaxpr(loss)(dist.params).jaxpr)  # the forward pass
        assert products and all(
            {v.aval.dtype for v in eqn.invars} == {jnp.dtype(jnp.bfloat16)}
            and eqn.outvars[0].aval.dtype == jnp.float32
            for eqn in products
        )
        grads = jax.jit(jax.grad(loss))(dist.params)
        assert all(
            g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads)
        )
    with pytest.raises(TypeError, match="matmul_dtype"):
        TransformerARM(5, 6, rngs=nnx.Rngs(0), matmul_dtype=jnp.int8)


def test_transformer_ebm_rewards_and_exact_normaliser():
    space = sp.SequenceSpace(vocab_size=3, length=3, eos=False)
    module = TransformerEBM(3, 4, rngs=nnx.Rngs(0), dtype=jnp.float64)
    ebm = sp.EBM.from_nnx(module, space)
    seqs = jnp.asarray(space.enumerate())
    rewards = ebm.unnormalized_log_prob(seqs)
    np.testing.assert_allclose(rewards, module(seqs), rtol=1e-12)
    np.testing.assert_allclose(ebm.log_partition(), oracles.logsumexp_np(rewards), rtol=1e-10)
    grads = jax.grad(lambda p: ebm.with_params(p).log_prob(seqs[0]))(ebm.params)
    assert jax.tree.structure(grads) == jax.tree.structure(ebm.params)


def test_ngram_exact_arm_is_the_same_distribution():
    module = _models()["ngram"]
    arm = sp.ARM.from_nnx(module, SPACE, PROMPT)
    table_arm = exact_arm(module, PROMPT)
    seqs = jnp.asarray(SPACE.enumerate())[:, None, :]
    np.testing.assert_allclose(arm.log_prob(seqs), table_arm.log_prob(seqs), atol=1e-6)
    assert table_arm.entropy().shape == (2,)


def test_stdlib_corpus_is_deterministic_and_round_trips():
    from seqppl.models.corpus import ALPHABET, decode, encode, stdlib_docstrings, windows

    train_a, heldout_a = stdlib_docstrings(max_files=40)
    train_b, heldout_b = stdlib_docstrings(max_files=40)
    assert train_a == train_b and heldout_a == heldout_b and len(train_a) > 1000
    ids = encode(train_a[:5000])
    assert ids.max() < len(ALPHABET) == 96
    assert decode(encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    assert decode(encode("café")) == "caf?"
    assert windows(ids, 64).shape == (len(ids) // 64, 64)


def test_paper_targets():
    from seqppl.models.paper import paper_target

    space = sp.SequenceSpace(vocab_size=4, length=3, eos=False)
    for target in ("zipf", "normal"):
        log_rho = paper_target(space, target, seed=1)
        assert log_rho.shape == (64,) and abs(float(jax.scipy.special.logsumexp(log_rho))) < 1e-5
        np.testing.assert_array_equal(log_rho, paper_target(space, target, seed=1))
    lexicographic = paper_target(space, "zipf", zipf_order="lexicographic")
    assert np.all(np.diff(np.asarray(lexicographic)) < 0)  # ρ decreases along the enumeration
    random_order = np.asarray(paper_target(space, "zipf", seed=1))
    np.testing.assert_allclose(np.sort(random_order)[::-1], lexicographic, rtol=1e-6)
    with pytest.raises(ValueError, match="zipf_order"):
        paper_target(space, "zipf", zipf_order="sorted")


def test_reproduce_refuses_bad_arguments():
    from seqppl.models.paper import reproduce

    for kwargs, name in (
        ({"config": "v9"}, "config"),
        ({"target": "cauchy"}, "target"),
        ({"adam_b2": 1.0}, "adam_b2"),
        ({"adam_b2": 0.0}, "adam_b2"),
        ({"lr": 0.0}, "lr"),
        ({"steps": 0}, "steps"),
        ({"checkpoint_every": 2.5}, "checkpoint_every"),
    ):
        with pytest.raises(ValueError, match=name):
            reproduce(**kwargs, progress=False)


def test_reproduce_resumes_an_interrupted_run(tmp_path, monkeypatch):
    """Ctrl-C during the ARM's training, then the same call: only the remaining steps run and
    the metrics equal a straight run's; run again, a finished run is rewritten without
    training; other settings in the same out are refused."""
    from seqppl.models import paper

    kwargs = {
        "steps": 6,
        "log_every": 1,
        "checkpoint_every": 2,
        "zipf_order": "lexicographic",
        "progress": False,
    }
    straight = paper.reproduce(**kwargs)
    real_metrics = paper.distance_metrics
    calls, interrupt_at = [], [4]

    def counted(*args):
        metrics = real_metrics(*args)

        def metrics_or_interrupt(arm):
            calls.append(arm)
            if len(calls) == interrupt_at[0]:
                raise KeyboardInterrupt
            return metrics(arm)

        return metrics_or_interrupt

    monkeypatch.setattr(paper, "distance_metrics", counted)
    with pytest.raises(KeyboardInterrupt):
        paper.reproduce(**kwargs, out=tmp_path)
    assert not (tmp_path / "metrics.csv").exists()
    for model in ("ebm", "arm"):
        assert (tmp_path / "checkpoints" / model / "checkpoint.pkl").exists()
    interrupt_at[0] = None
    for metric_calls in (3, 0):  # resumed at step 3, then finished
        calls.clear()
        resumed = paper.reproduce(**kwargs, out=tmp_path)
        assert len(calls) == metric_calls
        for name in paper.METRICS:
            np.testing.assert_array_equal(resumed[name], straight[name], err_msg=name)
        assert "resumed from" in (tmp_path / "summary.md").read_text()
    with pytest.raises(CheckpointError, match=r"other settings .*'lr': \(0.01, 0.5\)"):
        paper.reproduce(**{**kwargs, "lr": 0.5}, out=tmp_path)


def test_repetition_penalty_reads_the_vocabulary_of_its_space():
    """Regression: it assumed vocab_size=10, so in a 4-token space EOS padding (id 4) counted
    as repeated tokens."""
    from seqppl.models.tasks import repetition_penalty

    space = sp.SequenceSpace(4, 4, eos=True)
    reward = repetition_penalty(space, penalty=0.5)
    tokens = jnp.array([[1, 1, 4, 4, 4], [0, 1, 0, 1, 4], [2, 2, 2, 4, 4]])
    np.testing.assert_allclose(reward(tokens), [-0.5, 0.0, -1.0])
    with pytest.raises(TypeError, match="space must be a SequenceSpace"):
        repetition_penalty(4)
