"""The mask-only peers of ``bench_constraints.py``: outlines-core's index as engines use it, the
schema and its validity check, the bases the peers mask, and the timing helpers.

A mask-only step builds each sequence's base row (``TableBase``: a row of a dense n-gram table;
``SparseBigramBase``: the smoothed-count bigram rebuilt from its CSR slice, the same scatter as
the exact decoder's, ``models.bigram_dfa.CountRows.rows``), masks it with outlines-core's allowed
tokens, draws with ``plain_sample`` and advances the index:

- vectorised: ``get_allowed_tokens`` of every index state as a bool table ``[S_oc, A]`` and its
  transitions (``outlines_tables``), gathered per sequence; jitted: the fastest masking we could
  write;
- vLLM (v1's outlines backend, ``backend_outlines.py``): a Python call of
  ``Guide.write_mask_into`` per sequence into a 32-bit bitmask, then (jitted) unpack, mask,
  sample, then ``Guide.advance`` per sequence (none on EOS);
- outlines list: ``Guide.get_tokens()`` per sequence (a Python list) scattered into a bool mask,
  then the same jitted mask and sample: what Outlines' logits processors did.
"""

from __future__ import annotations

import functools
import json
import resource
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from outlines_core import Guide, Index, Vocabulary
from seqppl.models.bigram_dfa import CountRows

import seqppl as sp
from seqppl.constraints import json_schema_regex
from seqppl.masking import allowed_actions

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer"},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
}


def valid_document(text: str) -> bool:
    """Does ``text`` parse as JSON and satisfy ``SCHEMA`` (checked by hand, not by the regex)?"""
    try:
        doc = json.loads(text)
    except ValueError:
        return False
    return (
        isinstance(doc, dict)
        and set(doc) == {"name", "age", "ok"}
        and isinstance(doc["name"], str)
        and len(doc["name"]) <= 12
        and type(doc["age"]) is int
        and type(doc["ok"]) is bool
    )


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def alternate(variants, repeats):
    """``{name: (median s, [s per round])}``: each ``variants[name] = (run, reset)`` once to
    compile, then ``repeats`` rounds of all in turn; ``reset`` (untimed) undoes a step's state."""
    for run, reset in variants.values():
        jax.block_until_ready(run())
        reset()
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (run, reset) in variants.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
            reset()
    return {name: (statistics.median(ts), ts) for name, ts in times.items()}


def once(fn):
    start = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - start


# -- outlines-core's index -----------------------------------------------------------------------


class Peer(NamedTuple):
    """outlines-core's index over the vocabulary, and its dense tables (``outlines_tables``)."""

    index: Index
    dense: dict
    mask: np.ndarray
    delta: np.ndarray
    final: np.ndarray
    start: int


def outlines_tables(index: Index, num_actions: int):
    """``(dense id of each index state, mask bool [S+1, A], delta int32 [S+1, A], final bool)``
    from ``index.get_allowed_tokens`` and ``get_transitions``; row ``S`` is an all-masked sink."""
    transitions = index.get_transitions()
    names = sorted(set(transitions) | {s for out in transitions.values() for s in out.values()})
    dense = {name: k for k, name in enumerate(names)}
    sink = len(names)
    mask = np.zeros((sink + 1, num_actions), bool)
    delta = np.full((sink + 1, num_actions), sink, np.int32)
    for name, k in dense.items():
        out = transitions.get(name, {})
        mask[k, index.get_allowed_tokens(name) or []] = True
        delta[k, list(out)] = [dense[s] for s in out.values()]
    final = np.zeros(sink + 1, bool)
    final[[dense[s] for s in index.get_final_states()]] = True
    return dense, mask, delta, final


def compile_case(space, texts, rows):
    """``(dfa, peer)``: seqppl's token DFA and outlines-core's index of ``SCHEMA``, timed."""
    vocab = f"V={space.vocab_size}"
    pattern, t_regex = once(lambda: json_schema_regex(SCHEMA))
    dfa, t_dfa = once(lambda: sp.Lattice.json_schema(space, SCHEMA, texts))
    ids = {}
    for i, text in enumerate(texts):
        ids.setdefault(text, []).append(i)
    index, t_index = once(lambda: Index(pattern, Vocabulary(space.vocab_size, ids)))
    dense, mask, delta, final = outlines_tables(index, space.num_actions)
    rows += [
        (vocab, "JSON Schema → regex (outlines-core build_regex_from_schema)", "-", t_regex, None),
        (vocab, "outlines-core Index on the pattern (engines' compile)", len(dense), t_index, None),
        (vocab, "sp.Lattice.json_schema (minimised token DFA)", dfa.num_states, t_dfa, None),
    ]
    return dfa, Peer(index, dense, mask, delta, final, dense[index.get_initial_state()])


def guides_at(peer, prefix):
    """``(guides, dense index state [B])``: one ``Guide`` per row of ``prefix [B, t]``, advanced
    along it; asserted equal to the index table walked along the same tokens."""
    guides = [Guide(peer.index, max_rollback=1) for _ in range(len(prefix))]
    for g, row in zip(guides, prefix.tolist(), strict=True):
        for token in row:
            g.advance(token, return_tokens=False)
    states = np.array([peer.dense[g.get_state()] for g in guides], np.int32)
    walked = np.full(len(prefix), peer.start, np.int32)
    for column in prefix.T:
        walked = peer.delta[walked, column]
    assert (walked == states).all(), "the index table and the Guides disagree on the state"
    return guides, states


# -- the bases and the mask-only steps -----------------------------------------------------------


class TableBase(NamedTuple):
    """A dense n-gram base: ``q [S, A]`` and its Markov ``delta [S, A]``."""

    q: jax.Array
    delta: jax.Array

    def logits(self, b):
        return self.q[b]

    def next(self, b, token):
        return self.delta[b, token]


class SparseBigramBase(NamedTuple):
    """The smoothed-count bigram, rows rebuilt per step from its CSR slices."""

    rows: CountRows

    def logits(self, b):
        return self.rows.rows(b)

    def next(self, b, token):
        return jnp.where(token == self.rows.log_norm.shape[0] - 1, b, token)  # EOS stays


def plain_sample(key, logits):
    """Inverse CDF, one uniform per row; never an action at −∞."""
    keep = logits > -jnp.inf
    cdf = jnp.cumsum(jnp.exp(logits - jnp.max(logits, -1, keepdims=True)), -1)
    top = jnp.max(jnp.where(keep, cdf, 0.0), -1, keepdims=True)
    u = 1.0 - jax.random.uniform(key, logits.shape[:-1], logits.dtype)
    return jnp.argmax(keep & (cdf >= u[:, None] * top), -1).astype(jnp.int32)


@jax.jit
def masked_sample(key, base, b, keep):
    return plain_sample(key, jnp.where(keep, base.logits(b), -jnp.inf))


@functools.partial(jax.jit, static_argnames="num_actions")
def unpack_bits(words, num_actions):
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :num_actions] != 0


@functools.partial(jax.jit, static_argnames="num_actions")
def bitmask_sample(key, base, b, words, num_actions):
    return masked_sample(key, base, b, unpack_bits(words, num_actions))


@jax.jit
def table_mask_step(key, base, b, mask, delta, oc_states):
    token = masked_sample(key, base, b, mask[oc_states])
    return token, base.next(b, token), delta[oc_states, token]


@functools.partial(jax.jit, static_argnames=("num", "horizon"))
def mask_decode(key, base, base_start, mask, delta, oc_start, num, horizon):
    """The vectorised mask-only decoder over ``horizon`` decisions (EOS = A − 1 forced at the last
    one, and after the first): ``(tokens [num, T], index state at the end [num])``."""
    eos = mask.shape[-1] - 1
    only_eos = jnp.arange(mask.shape[-1]) == eos

    def body(carry, inputs):
        b, o, done = carry
        t, step_key = inputs
        keep = jnp.where(t == horizon - 1, only_eos, mask[o])
        token = jnp.where(done, eos, masked_sample(step_key, base, b, keep))
        new_o = jnp.where(done, o, delta[o, token])
        return (base.next(b, token), new_o, done | (token == eos)), token

    start = (jnp.full(num, base_start), jnp.full(num, oc_start), jnp.zeros(num, bool))
    keys = jax.random.split(key, horizon)
    (_, o, _), tokens = jax.lax.scan(body, start, (jnp.arange(horizon), keys))
    return tokens.T, o


def engine_variants(guides, peer, base, b, eos):
    """``{name: (run, reset)}``: the vLLM and outlines-list steps of the batch (``b``: each
    sequence's base state); ``reset`` rolls the guides back to the prefixes."""
    key, B, A = jax.random.key(1), len(guides), peer.mask.shape[1]
    moved = np.zeros(B, bool)
    at = [peer.dense[g.get_state()] for g in guides]

    def engine_step(fill):
        buffer = np.zeros((B, (A + 31) // 32), np.int32) if fill else np.zeros((B, A), bool)
        for i, g in enumerate(guides):
            if fill:
                g.write_mask_into(buffer[i].ctypes.data, buffer.shape[1], 4)
            else:
                buffer[i, g.get_tokens()] = True
        if fill:
            tokens = np.asarray(bitmask_sample(key, base, b, jnp.asarray(buffer), A))
        else:
            tokens = np.asarray(masked_sample(key, base, b, jnp.asarray(buffer)))
        moved[:] = tokens != eos  # vLLM never advances a guide on EOS
        for g, token in zip(np.array(guides)[moved], tokens[moved].tolist(), strict=True):
            g.advance(token, return_tokens=False)
        return tokens

    def rollback():  # untimed: back to the batch's prefixes
        for g in np.array(guides)[moved]:
            g.rollback_state(1)
        assert [peer.dense[g.get_state()] for g in guides] == at

    return {
        "mask-only, vLLM: Guide.write_mask_into per seq + jit mask/sample + advance": (
            lambda: engine_step(True), rollback),
        "mask-only, outlines: Guide.get_tokens() list per seq + jit mask/sample + advance": (
            lambda: engine_step(False), rollback),
    }  # fmt: skip


def check_supports(dfa, peer, guides, at, t, base, first_rows, exact_t):
    """Asserts the support rules of bench_constraints' docstring for the batch in flight at
    decision ``t`` (``at``: each sequence's ``dfa`` and ``oc`` state); ``first_rows = (base's
    start state, its float64 log-weights [A] there, the exact decoder's first logits [A])``,
    ``exact_t [B, A]`` the exact logits at ``t``. Returns seqppl's myopic mask ``[B, A]``."""
    myopic = allowed_actions(dfa, "myopic")
    allowed = myopic[t][at["dfa"]]
    B, A = allowed.shape
    words = np.zeros((B, (A + 31) // 32), np.int32)
    listed = np.zeros((B, A), bool)
    for i, g in enumerate(guides):
        g.write_mask_into(words[i].ctypes.data, words.shape[1], 4)
        listed[i, g.get_tokens()] = True
    bits = np.asarray(unpack_bits(jnp.asarray(words), A))
    for name, oc in (("table", peer.mask[at["oc"]]), ("bitmask", bits), ("list", listed)):
        bad = np.argwhere(oc != allowed)
        assert not bad.size, f"outlines {name} ≠ DFA allowed at (sequence, token) {bad[0]}"
    finite = np.asarray(exact_t) > -np.inf
    assert finite.any(-1).all() and not (finite & ~allowed).any(), "exact support ⊄ allowed"
    first = myopic[0, dfa.initial]  # the first decision
    assert (peer.mask[peer.start] == first).all(), "first step: outlines ≠ DFA allowed"
    base_start, base_first, exact_first = first_rows
    p_base = np.where(first, np.exp(base_first - base_first.max()), 0.0)
    logits = base.logits(jnp.full(1, base_start, jnp.int32))
    got = jax.nn.softmax(jnp.where(first, logits, -jnp.inf))[0]  # what the mask-only step draws
    np.testing.assert_allclose(np.asarray(got), p_base / p_base.sum(), rtol=1e-4, atol=1e-9)
    assert not ((np.asarray(exact_first) > -np.inf) & ~first).any(), "exact first step ⊄ allowed"
    return allowed
