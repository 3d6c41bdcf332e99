"""Twisted SMC under a regex constraint for a character Transformer: the shared set-up of
``examples/twisted_constraints.py`` and ``benchmarks/twist_scaling.py`` (docs/twisted_smc.md).

- ``word_data``: the words of the stdlib docstrings (``seqppl.models.corpus``, whitespace-
  separated, at most ``length`` characters), EOS-padded;
- ``train_base``: a causal ``TransformerARM`` over those characters fit by ``sp.fit``; no
  lattice holds it, so base × constraint has no exact ``M`` (the prefix is the state);
- ``bigram_fit``: a Markov(1) table ARM fit by ``sp.fit`` to the base's own samples, the
  finite-state approximation whose ``.constrain(dfa)`` gives SMC its lattice twist (exact soft
  values of bigram × DFA);
- ``exact_target``: the conditional ``p(y) ∝ p_base(y) · 1[y accepted]`` on a space whose accepted
  set can be listed (``models.tv_bounds.accepted_sequences``): ``log Z = log P_base(accepted)``
  and ``log p`` of every accepted sequence;
- ``particle_metrics``: what one run's weighted particles say about that target.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from seqppl.models.corpus import ALPHABET, encode, stdlib_docstrings
from seqppl.models.transformer import TransformerARM
from seqppl.models.tv_bounds import accepted_sequences

import seqppl as sp
from seqppl.diagnostics import kish_ess

__all__ = [
    "TEXTS",
    "BaseConfig",
    "ExactTarget",
    "word_data",
    "train_base",
    "base_on",
    "bigram_fit",
    "exact_target",
    "weight_metrics",
    "particle_metrics",
    "exact_draws",
    "run_arrays",
]

TEXTS = list(ALPHABET)
"""The text of each character id (the corpus alphabet: newline and printable ASCII)."""


class BaseConfig(NamedTuple):
    """The character Transformer and its training: words of at most ``length`` characters from
    the first ``max_files`` stdlib files (None: all), ``sp.fit`` for ``steps`` Adam steps."""

    max_files: int | None = 600
    length: int = 16
    layers: int = 2
    heads: int = 4
    dim: int = 32
    mlp_dim: int = 64
    steps: int = 2000
    batch_size: int = 256
    learning_rate: float = 3e-3
    seed: int = 0


class ExactTarget(NamedTuple):
    """The conditional on an enumerable accepted set: ``sequences`` int ``[N, T]`` (EOS-padded),
    ``log_p`` float64 ``[N]`` (normalised target log-probabilities), ``log_z`` (``log P_base``
    of the constraint) and ``index`` (a sequence's bytes → its row)."""

    sequences: np.ndarray
    log_p: np.ndarray
    log_z: float
    index: dict


def word_data(max_files: int | None, length: int) -> tuple[sp.SequenceSpace, np.ndarray]:
    """``(space, words int [N, length + 1])``: the training split's words of at most ``length``
    characters, each followed by EOS (the space has EOS, so a word ends where it ends)."""
    text, _ = stdlib_docstrings(max_files)
    words = [w for w in text.split() if len(w) <= length]
    space = sp.SequenceSpace(vocab_size=len(ALPHABET), length=length, eos=True)
    data = np.full((len(words), space.horizon), space.eos_id, np.int32)
    for row, word in zip(data, words, strict=True):
        row[: len(word)] = encode(word)
    return space, data


def train_base(config: BaseConfig, checkpoint_dir=None, progress: bool = False):
    """``(module, trained params, sp.fit history)``: the Transformer trained by teacher forcing
    on ``word_data``; with ``checkpoint_dir`` a finished or interrupted fit of the same run
    resumes (a finished one returns at once)."""
    space, data = word_data(config.max_files, config.length)
    module = TransformerARM(
        space.num_actions,
        space.horizon,
        config.layers,
        config.heads,
        config.dim,
        config.mlp_dim,
        rngs=nnx.Rngs(config.seed),
    )
    with jax.numpy_rank_promotion("allow"):
        arm = sp.ARM.from_nnx(module, space)
        trained, history = sp.fit(
            arm,
            data,
            steps=config.steps,
            batch_size=config.batch_size,
            key=jax.random.key(config.seed),
            learning_rate=config.learning_rate,
            log_every=max(config.steps // 10, 1),
            checkpoint_dir=checkpoint_dir,
            progress=progress,
        )
    return module, trained.params, history


def base_on(module: TransformerARM, params, length: int) -> sp.ARM:
    """The trained Transformer as an ARM over words of at most ``length`` characters (its last
    decision is the forced EOS: a longer word is cut there, at the length limit)."""
    space = sp.SequenceSpace(module.num_actions - 1, length, eos=True)
    return sp.ARM.from_nnx(module, space, params=params)


def bigram_fit(
    base: sp.ARM, key, num_samples: int = 20_000, steps: int = 500, checkpoint_dir=None
) -> sp.ARM:
    """A Markov(1) table ARM fit by ``sp.fit`` (likelihood, Adam at 0.1) to ``num_samples``
    draws of ``base``: the finite-state approximation of the base (``checkpoint_dir``: as in
    ``sp.fit``, a finished fit of the same draws is read back)."""
    space = base.space
    sample_key, fit_key = jax.random.split(key)
    with jax.numpy_rank_promotion("allow"):
        draws = np.asarray(base.sample(sample_key, (num_samples,)))
    lattice = sp.Lattice.markov(space, 1)
    table = sp.ARM.from_table(lattice, jnp.zeros((lattice.num_states, space.num_actions)))
    fitted, _ = sp.fit(
        table,
        draws,
        steps=steps,
        batch_size=1024,
        key=fit_key,
        learning_rate=0.1,
        checkpoint_dir=checkpoint_dir,
        progress=False,
    )
    return fitted


def exact_target(base: sp.ARM, dfa: sp.Lattice, limit: int = 10**6, chunk: int = 1 << 15):
    """The ``ExactTarget`` of ``base.constrain(dfa)``: every accepted sequence listed (at most
    ``limit``, else ``ValueError``) and scored by ``base.log_prob`` in jitted chunks."""
    sequences = accepted_sequences(dfa, limit)
    if sequences is None:
        raise ValueError(f"the constraint accepts more than {limit} sequences: not enumerable")
    score = jax.jit(base.log_prob)
    count = len(sequences)
    padded = np.concatenate([sequences, np.repeat(sequences[:1], (-count) % chunk, 0)])
    with jax.numpy_rank_promotion("allow"):
        parts = [
            np.asarray(score(jnp.asarray(b))) for b in padded.reshape(-1, chunk, padded.shape[1])
        ]
    log_q = np.concatenate(parts)[:count].astype(np.float64)
    log_z = float(np.logaddexp.reduce(log_q))
    index = {row.tobytes(): i for i, row in enumerate(sequences)}
    return ExactTarget(sequences, log_q - log_z, log_z, index)


def run_arrays(estimate: sp.PartitionEstimate, runs: int):
    """``(tokens int [R, P, T], log_w float64 [R, P])``: an estimate's kept draws split into
    ``runs`` runs (SMC: its replicates; IS: consecutive blocks of i.i.d. draws). Each row's
    ``logsumexp − log P`` is that run's ``log Ẑ``; ``max_kept`` must cover every draw."""
    log_w = np.asarray(estimate.log_weights, np.float64)
    tokens = np.asarray(estimate.samples)
    if log_w.size != estimate.num_samples:
        raise ValueError("the estimate kept only part of its draws; raise max_kept")
    return tokens.reshape(runs, -1, tokens.shape[-1]), log_w.reshape(runs, -1)


def weight_metrics(tokens, log_w, eos_id: int) -> dict:
    """What one run's final particles ``tokens [P, T]`` and weights ``log_w [P]`` (``Ẑ``
    included) say without the target: ``log_z`` (``log Ẑ``, −∞ when every weight is 0),
    ``ess`` (Kish's ESS of the final weights per particle), ``accepted`` (the share with
    positive weight) and ``runaway`` (the share that ran to the length limit, no EOS before
    the forced one, unaccepted)."""
    tokens, log_w = np.asarray(tokens), np.asarray(log_w, np.float64)
    alive = np.isfinite(log_w)
    limit = tokens[:, -2] != eos_id  # the last decision is the forced EOS
    return {
        "log_z": float(np.logaddexp.reduce(log_w) - np.log(log_w.size)),
        "ess": kish_ess(log_w) / log_w.size,
        "accepted": float(np.mean(alive)),
        "runaway": float(np.mean(limit & ~alive)),
    }


def particle_metrics(target: ExactTarget, tokens, log_w, eos_id: int) -> dict:
    """``weight_metrics`` and the run's particle approximation ``p̂ ∝ Σ_i w_i δ_{y_i}`` against
    the exact target ``p``: ``{name: float}``.

    ``tv`` ``½ Σ_y |p̂(y) − p(y)|``; ``kl_rev`` ``KL(p̂ ‖ p)``; ``missing`` ``p(y ∉ support p̂)``,
    with ``kl_fwd`` ``KL(p ‖ p̂)`` ∞ while it is positive; ``log_z_error`` ``log Ẑ − log Z``. An
    empty ``p̂`` (every weight 0) has ``tv`` 1, ``missing`` 1 and NaN KLs."""
    out = weight_metrics(tokens, log_w, eos_id)
    out["log_z_error"] = out["log_z"] - target.log_z
    tokens, log_w = np.asarray(tokens), np.asarray(log_w, np.float64)
    alive = np.isfinite(log_w)
    if not alive.any():
        return {**out, "tv": 1.0, "kl_rev": np.nan, "kl_fwd": np.nan, "missing": 1.0}
    rows, inverse = np.unique(tokens[alive], axis=0, return_inverse=True)
    p_hat = np.bincount(inverse.reshape(-1), np.exp(log_w[alive] - log_w[alive].max()), len(rows))
    p_hat /= p_hat.sum()
    where = np.array([target.index.get(row.astype(np.int32).tobytes(), -1) for row in rows])
    if (where < 0).any():
        raise ValueError("a particle with positive weight is not in the accepted set")
    log_p = target.log_p[where]
    p = np.exp(log_p)
    missing = 0.0 if len(rows) == len(target.log_p) else max(0.0, 1.0 - float(p.sum()))
    positive = p_hat > 0
    kl_rev = float(np.sum(p_hat[positive] * (np.log(p_hat[positive]) - log_p[positive])))
    kl_fwd = np.inf if missing > 0 else float(np.sum(p * (log_p - np.log(p_hat))))
    tv = 0.5 * (float(np.abs(p_hat - p).sum()) + missing)
    return {**out, "tv": tv, "kl_rev": kl_rev, "kl_fwd": kl_fwd, "missing": missing}


def exact_draws(target: ExactTarget, count: int, seed: int):
    """``(tokens [count, T], log_w [count])``: i.i.d. draws from the exact target with equal
    weights carrying ``Z`` (the reference no sampler can beat at ``count`` particles)."""
    rows = np.random.default_rng(seed).choice(len(target.log_p), count, p=np.exp(target.log_p))
    return target.sequences[rows], np.full(count, target.log_z)
