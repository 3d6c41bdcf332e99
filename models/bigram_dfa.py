"""Exact lookahead decoding of a smoothed-count bigram under a token DFA, factored: the soft
Bellman pass on the product lattice bigram × DFA without its ``[T, S_base · Q, A]`` tables.

The base is the bigram of ``bpe.ngram_base(tokenizer, space, 1, method="counts",
pseudocount=α)``, with sparse counts ``c`` (``bpe.ngram_counts``):

    p(a | s) = (c[s, a] + α) / (n_s + α A),        n_s = Σ_a c[s, a],

for contexts ``s ∈ {0..V}`` (the previous token; ``V`` is the start context) and actions
``a ∈ {0..V}`` (EOS = ``V``, ``A = V + 1``). The target is ``p_base(y) · 1[dfa accepts y]``, the
EBM ``base.constrain(dfa)``: at the last decision only EOS is left (probability 1), the DFA's EOS
column is a self-loop and ``y`` is accepted when the DFA ends in ``dfa.accepting``. Its soft
values on the pairs ``(s, q)`` (bigram context, DFA state) are

    V_{T−1}[s, q] = log 1[q accepting],
    V_t[s, q]     = log Σ_a p(a | s) · exp G_t[q, a]            (t < T − 1),
    G_t[q, a]     = V_{t+1}[a, δ(q, a)] for a token a,  log 1[q accepting] for EOS,

and ``log Z = V_0[V, q_0]``. With ``W[a, q] = exp(G_t[q, a] − m_q)``, ``m_q = max_a G_t[q, a]``,
one decision is a sparse product and a rank-one term,

    V_t[s, q] = m_q + log((C W)[s, q] + α Σ_a W[a, q]) − log(n_s + α A),

``nnz(C) · Q + A · Q`` work instead of the product's ``(V+1) · Q · A``. Terms that underflow in
``W`` are below ``exp(−87) · max c`` against the ``α · 1`` of the largest one, so ``α`` bounds the
rounding. The exact decoder (``exact_arm``) has the logits

    log(c[s, a] + α) − log(n_s + α A) + G_t[q, a] − V_t[s, q]

at decision ``t`` in ``(s, q)``, built per step from the dense row ``G_t[q]`` and the CSR slice
of row ``s`` (``CountRows.rows``); mask-only decoders build their base rows the same way.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from seqppl.models.bpe import ngram_counts

import seqppl as sp
from seqppl.checks import check_number

__all__ = [
    "BigramCounts",
    "CountRows",
    "FactoredBigramDFA",
    "FactoredLogits",
    "bigram_counts",
    "factored_dp",
]


class BigramCounts(NamedTuple):
    """The counts of a bigram over ``space`` as CSR ``[V+1, A]`` (NumPy), and its pseudocount.

    Row ``s`` holds ``actions[indptr[s]:indptr[s+1]]`` (int32, increasing) with ``counts`` (float64
    ``[K]``); ``indptr`` is int64 ``[V+2]``. ``p(a | s) = (c[s, a] + α) / (n_s + α A)``.
    """

    space: sp.SequenceSpace
    indptr: np.ndarray
    actions: np.ndarray
    counts: np.ndarray
    pseudocount: float

    def row_ids(self) -> np.ndarray:
        """The context ``s`` of each count, int64 ``[K]`` (the COO rows)."""
        return np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))

    def row_totals(self) -> np.ndarray:
        """``n_s`` float64 ``[V+1]``."""
        return np.bincount(self.row_ids(), self.counts, minlength=len(self.indptr) - 1)

    def dense_row(self, s: int) -> np.ndarray:
        """``log p(· | s)`` float64 ``[A]`` (a check of one row; never the whole table)."""
        row = np.zeros(self.space.num_actions)
        lo, hi = self.indptr[s], self.indptr[s + 1]
        row[self.actions[lo:hi]] = self.counts[lo:hi]
        A = self.space.num_actions
        return np.log(row + self.pseudocount) - np.log(self.row_totals()[s] + self.pseudocount * A)


def bigram_counts(windows, space: sp.SequenceSpace, pseudocount: float = 0.1) -> BigramCounts:
    """The ``BigramCounts`` of the decisions ``windows [N, T]`` make (``bpe.token_windows``): the
    base of ``ngram_base(tokenizer, space, 1, method="counts", pseudocount=pseudocount)``.

    Raises:
        ValueError: ``pseudocount`` is not a finite number > 0, ``space`` has no EOS, or
            ``windows`` are not sequences of ``space``.
    """
    pseudocount = check_number("pseudocount", pseudocount, 0, np.inf)
    if not space.eos:
        raise ValueError(f"space must have EOS (a variable-length space), got {space}")
    states, actions, counts = ngram_counts(windows, space, order=1)
    indptr = np.searchsorted(states, np.arange(space.vocab_size + 2))
    return BigramCounts(space, indptr, actions, counts, pseudocount)


class CountRows(NamedTuple):
    """``BigramCounts`` on the device (a pytree): ``rows(s, extra)`` builds ``log p(· | s)``.

    ``actions`` int32 and ``log_ratio = log(c + α) − log α`` are ``[K + w]``, padded with ``w``
    zeros so that every slice of width ``w`` (the largest row's nnz; ``offsets = 0..w−1``) stays
    inside; ``indptr`` int32 ``[V+2]``, ``log_norm = log(n_s + α A)`` ``[V+1]``.
    """

    indptr: jax.Array
    actions: jax.Array
    log_ratio: jax.Array
    offsets: jax.Array
    log_norm: jax.Array
    log_alpha: jax.Array

    @classmethod
    def build(cls, counts: BigramCounts, dtype) -> CountRows:
        """The device arrays of ``counts`` in float ``dtype``."""
        width = max(int(np.diff(counts.indptr).max()), 1)
        alpha, A = counts.pseudocount, counts.space.num_actions
        pad = np.zeros(width)
        return cls(
            jnp.asarray(counts.indptr, jnp.int32),
            jnp.asarray(np.concatenate([counts.actions, pad]), jnp.int32),
            jnp.asarray(np.concatenate([np.log1p(counts.counts / alpha), pad]), dtype),
            jnp.arange(width, dtype=jnp.int32),
            jnp.asarray(np.log(counts.row_totals() + alpha * A), dtype),
            jnp.asarray(np.log(alpha), dtype),
        )

    def rows(self, s, extra=0.0) -> jax.Array:
        """``extra + log p(· | s_n)`` float ``[N, A]`` for contexts int ``[N]`` (``extra``
        broadcast to ``[N, A]``): the constant ``log α − log(n_s + α A)`` everywhere, then row
        ``s``'s CSR slice (``lax.dynamic_slice`` of width ``w``, masked beyond the row's end)
        scattered in."""
        start, stop = self.indptr[s], self.indptr[s + 1]
        width = self.offsets.shape[0]
        take = jax.vmap(lambda x, i: jax.lax.dynamic_slice(x, (i,), (width,)), (None, 0))
        inside = self.offsets[None, :] < (stop - start)[:, None]
        added = jnp.where(inside, take(self.log_ratio, start), 0)
        shape = (s.shape[0], self.log_norm.shape[0])  # a bigram: V + 1 contexts and actions
        base = jnp.broadcast_to(extra + (self.log_alpha - self.log_norm[s])[:, None], shape)
        return base.at[jnp.arange(s.shape[0])[:, None], take(self.actions, start)].add(added)


@functools.partial(jax.jit, static_argnames="horizon")
def _backward(rows: CountRows, states, counts, delta, accept, horizon):
    """``(values [T, V+1, Q], continuation [T, Q, A])``: ``V_t`` and ``G_t`` of the module
    docstring; ``states``/``counts`` ``[K]`` the COO rows and counts of ``C``."""
    num_states, num_tokens = rows.log_norm.shape[0], delta.shape[1] - 1
    tokens = jnp.arange(num_tokens)
    last = jnp.broadcast_to(accept, (num_states, accept.shape[0]))
    alpha = jnp.exp(rows.log_alpha)

    def body(value_next, _):
        after = value_next[tokens[None, :], delta[:, :-1]]  # V_{t+1}[a, δ(q, a)], [Q, V]
        g = jnp.concatenate([after, accept[:, None]], 1)  # G_t [Q, A]
        m = jnp.max(g, -1)
        m = jnp.where(jnp.isfinite(m), m, 0)
        w = jnp.exp(g - m[:, None]).T  # [A, Q]; 0 on dead transitions
        cw = jax.ops.segment_sum(
            counts[:, None] * w[rows.actions[: counts.shape[0]]],
            states,
            num_segments=num_states,
            indices_are_sorted=True,
        )
        value = jnp.log(cw + alpha * jnp.sum(w, 0)[None]) + m[None] - rows.log_norm[:, None]
        return value, (value, g)

    _, (values, gs) = jax.lax.scan(body, last, length=horizon - 1, reverse=True)
    no_token = jnp.full((accept.shape[0], num_tokens), -jnp.inf, accept.dtype)
    only_eos = jnp.concatenate([no_token, accept[:, None]], 1)
    return jnp.concatenate([values, last[None]]), jnp.concatenate([gs, only_eos[None]])


@dataclasses.dataclass(frozen=True, eq=False)
class FactoredBigramDFA:
    """The soft values of bigram × DFA (``factored_dp``), and the exact decoder built on them.

    Attributes:
        counts: the ``BigramCounts``.
        dfa: the token DFA (with ``accepting``), over the same space.
        values: ``V_t[s, q]`` float ``[T, V+1, Q]``.
        continuation: ``G_t[q, a]`` float ``[T, Q, A]``.
        rows: ``CountRows`` of ``counts`` (device arrays, the dtype of ``values``).
    """

    counts: BigramCounts
    dfa: sp.Lattice
    values: jax.Array
    continuation: jax.Array
    rows: CountRows

    @property
    def log_partition(self) -> jax.Array:
        """``log Z = log P_base(dfa accepts y) = V_0[V, q_0]`` (−∞ when nothing is accepted)."""
        return self.values[0, self.counts.space.vocab_size, self.dfa.initial]

    def exact_arm(self) -> sp.ARM:
        """The ARM of ``p ∝ p_base · 1[accepted]`` (``sp.to_arm(base.constrain(dfa))``'s
        distribution), sampled by cached steps (``sp.CachedLogits``).

        Raises:
            ValueError: ``log Z = −∞``: the DFA accepts no sequence of the space, so there is
                no conditional to decode.
        """
        if self.log_partition == -jnp.inf:
            raise ValueError(
                "the dfa accepts no sequence of the space (log Z = -inf): there is no "
                "conditional distribution to decode"
            )
        params = dict(
            rows=self.rows,
            values=self.values,
            continuation=self.continuation,
            delta=jnp.asarray(self.dfa.delta),
        )
        return sp.ARM(FactoredLogits(self.dfa), self.counts.space, params=params)


def factored_dp(counts: BigramCounts, dfa: sp.Lattice, dtype=None) -> FactoredBigramDFA:
    """The soft-Bellman pass of bigram × DFA, factored (the module docstring's equations): one
    jitted ``lax.scan`` over the decisions, a ``segment_sum`` over the counts per decision.

    Args:
        counts: the bigram (``bigram_counts``).
        dfa: a token DFA over ``counts.space`` with accepting states (``sp.Lattice.regex``,
            ``json_schema``, or ``automaton(..., accepting=...)``).
        dtype: float dtype of the pass (default: float64 under ``jax_enable_x64``, else float32).

    Raises:
        ValueError: ``dfa`` is over another space, or carries no accepting states.
    """
    space = counts.space
    if dfa.space != space:
        raise ValueError(f"dfa is over {dfa.space}, not the counts' space {space}")
    if dfa.accepting is None:
        raise ValueError("dfa carries no accepting states (compile it with Lattice.regex)")
    dtype = jnp.result_type(float) if dtype is None else jnp.dtype(dtype)
    rows = CountRows.build(counts, dtype)
    accept = jnp.where(jnp.asarray(dfa.accepting), 0.0, -jnp.inf).astype(dtype)
    values, continuation = _backward(
        rows,
        jnp.asarray(counts.row_ids(), jnp.int32),
        jnp.asarray(counts.counts, dtype),
        jnp.asarray(dfa.delta),
        accept,
        space.horizon,
    )
    return FactoredBigramDFA(counts, dfa, values, continuation, rows)


@dataclasses.dataclass(frozen=True)
class FactoredLogits:
    """The exact decoder's logits (``sp.CachedLogits``, ``params`` first in each call). Equal
    over the same DFA (its only static part), so that jitted callers compile once per DFA.

    ``params``: ``rows`` (``CountRows``), ``values [T, V+1, Q]``, ``continuation [T, Q, A]`` and
    the DFA's ``delta`` int32 ``[Q, A]``. The cache is ``(s, q, t)``: contexts and DFA states
    ``[*batch]`` and the decision (a shared scalar). At the last decision only EOS is finite.
    """

    dfa: sp.Lattice

    def logits(self, params, s, q, t) -> jax.Array:
        """Logits ``[*shape, A]`` at decisions ``t`` (broadcast) in states ``(s, q) [*shape]``;
        a state with ``V_t = −∞`` (no accepted completion) has every logit −∞."""
        shape = s.shape
        s, q = s.reshape(-1), q.reshape(-1)
        t = jnp.broadcast_to(jnp.minimum(t, params["values"].shape[0] - 1), shape).reshape(-1)
        value = params["values"][t, s, q]
        value = jnp.where(value == -jnp.inf, 0, value)
        rows = params["rows"].rows(s, params["continuation"][t, q] - value[:, None])
        return rows.reshape(*shape, rows.shape[-1])

    def __call__(self, params, tokens):
        """Teacher forcing: logits ``[..., T, A]`` along ``tokens [..., T]``."""
        tokens = jnp.asarray(tokens, jnp.int32)
        start = jnp.full((*tokens.shape[:-1], 1), self.dfa.space.vocab_size, jnp.int32)
        s = jnp.concatenate([start, tokens[..., :-1]], -1)
        q = self.dfa.states(tokens, trusted=True)
        return self.logits(params, s, q, jnp.arange(tokens.shape[-1]))

    def init(self, params, batch_shape):
        """``(logits [*batch_shape, A], (s, q, t))`` of the first decision."""
        s = jnp.full(batch_shape, self.dfa.space.vocab_size, jnp.int32)
        q = jnp.full(batch_shape, self.dfa.initial, jnp.int32)
        t = jnp.zeros((), jnp.int32)
        return self.logits(params, s, q, t), (s, q, t)

    def step(self, params, cache, token):
        """``(logits, cache)`` of the next decision after ``token [*batch]`` (EOS stays put)."""
        s, q, t = cache
        s = jnp.where(token == self.dfa.space.eos_id, s, token)
        q, t = params["delta"][q, token], t + 1
        return self.logits(params, s, q, t), (s, q, t)
