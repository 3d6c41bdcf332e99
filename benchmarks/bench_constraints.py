"""Constrained decoding at a real vocabulary: a JSON Schema against the ~27k-token corpus BPE,
the exact DP on base × token DFA, batched exact sampling, and the exact lookahead step per token
against the mask-only step of engines (outlines-core's allowed tokens + masking), in one run.

(a) Compile ``SCHEMA`` (outlines-core's default whitespace ``[ ]?``) with ``sp.Lattice.json_schema``
(pruned, minimised token DFA) and, separately, outlines-core's own ``Index`` on the plain pattern
(what engines build). (b) A unigram base (Markov(0), fit by counts): its product with the DFA has
the DFA's states, so ``sp.to_arm(base.constrain(dfa))`` (M: the table ``q [T, S, A]``) fits at
27k. (c) A bigram base at the largest vocabulary whose dense product fits (V = 512, peak RSS
≈ 10 GiB; at 27k, q alone would be ``dense_bigram_bytes`` ≈ 6 TiB). Each: the DP (one call,
XLA compilation included), ``arm.sample`` of B sequences (every one asserted a valid document),
and the vectorised mask-only decoder below over the same horizon (its share of valid documents).
(d) One decoding step of the same B sequences in flight (prefixes of the exact samples, all at
decision ``t``; none finished), by:

- exact, seqppl: the table ARM's decode step, the body of its sampler's scan (``arm.decoder`` +
  ``draw_step``: the row ``q[t, s]`` of each sequence's product state, normalised, one draw by
  inverse CDF, δ); jitted. At the full sizes q exceeds ``PRECOMPUTED_CDF_MAX``, so rows are
  normalised per step, as in ``arm.sample``; under ``--tiny`` the unigram table is small enough
  that the step re-derives the sampler's precomputed CDF table on every call (the sampler does
  it once per call), so tiny ratios mean nothing;
- exact, plain jnp: the same row gather with ``plain_sample`` (the lookahead alone); jitted;
- exact, precomputed CDF rows: ``cumsum softmax q[t]`` once, then a row gather and a
  compare-count per step (what seqppl's sampler does for tables below ``PRECOMPUTED_CDF_MAX``);
- mask-only, vectorised: outlines-core's ``get_allowed_tokens`` of every index state as a bool
  table ``[S_oc, A]`` and its transitions, gathered per sequence, ``where(mask, base logits,
  −∞)``, ``plain_sample``, the index transition; jitted: the fastest masking we could write;
- mask-only, vLLM: what vLLM v1's outlines backend does (``backend_outlines.py``): a Python call
  of ``Guide.write_mask_into`` per sequence into a 32-bit bitmask, then (jitted) unpack, mask,
  sample, then ``Guide.advance`` per sequence (none on EOS);
- mask-only, outlines list: ``Guide.get_tokens()`` per sequence (a Python list) scattered into a
  bool mask, then the same jitted mask and sample: what Outlines' logits processors did.

``plain_sample``: ``cdf = cumsum exp(logits − max)``, the first allowed action whose ``cdf``
reaches ``u · top``, one uniform per row (seqppl's inverse CDF, without its log-softmax pass and
step log-probabilities). Asserted first, for every sequence of the batch: outlines-core's allowed
set (from the table, the bitmask and the list alike) equals seqppl's myopic mask of the same
prefix (the DFA's allowed tokens); the exact row's support is a non-empty subset of it; every
drawn token is allowed; at the first decision, the mask-only distribution is the base
renormalised on the allowed set (float64 check) and the exact one's support is within it. Then
the steps run alternately, ``--repeats`` rounds (Python-side state reset between, untimed);
medians; the ratio is the median over rounds of the seqppl exact step's time over each row's.
Goal: exact ≤ 1.2 × mask-only per token.

    python benchmarks/bench_constraints.py          # 27k unigram + V=512 bigram, B=1024 (~5 min)
    python benchmarks/bench_constraints.py --tiny   # seconds: the smoke run of make test-all
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import resource
import statistics
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from outlines_core import Guide, Index, Vocabulary
from seqppl.models import bpe, corpus

import seqppl as sp
from seqppl.constraints import json_schema_regex
from seqppl.distributions.ancestral import draw_step
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


def dense_bigram_bytes(vocab: int, num_dfa: int, horizon: int) -> float:
    """float32 bytes of the bigram × DFA logits table ``q [T, (V+1)·S_dfa, V+1]``."""
    return 4.0 * horizon * (vocab + 1) * num_dfa * (vocab + 1)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# -- the peer: outlines-core's index, as engines use it ------------------------------------------


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


def plain_sample(key, logits):
    """Inverse CDF, one uniform per row; never an action at −∞."""
    keep = logits > -jnp.inf
    cdf = jnp.cumsum(jnp.exp(logits - jnp.max(logits, -1, keepdims=True)), -1)
    top = jnp.max(jnp.where(keep, cdf, 0.0), -1, keepdims=True)
    u = 1.0 - jax.random.uniform(key, logits.shape[:-1], logits.dtype)
    return jnp.argmax(keep & (cdf >= u[:, None] * top), -1).astype(jnp.int32)


@jax.jit
def masked_sample(key, base_q, base_states, keep):
    return plain_sample(key, jnp.where(keep, base_q[base_states], -jnp.inf))


@functools.partial(jax.jit, static_argnames="num_actions")
def unpack_bits(words, num_actions):
    bits = (words[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    return bits.reshape(words.shape[0], -1)[:, :num_actions] != 0


@jax.jit
def bitmask_sample(key, base_q, base_states, words):
    return masked_sample(key, base_q, base_states, unpack_bits(words, base_q.shape[-1]))


@jax.jit
def table_mask_step(key, base_q, base_states, mask, delta, oc_states):
    token = masked_sample(key, base_q, base_states, mask[oc_states])
    return token, delta[oc_states, token]


def mask_decode(key, base_q, base_delta, base_start, mask, delta, oc_start, num, horizon):
    """The vectorised mask-only decoder over ``horizon`` decisions (EOS = A − 1 forced at the last
    one, and after the first): ``(tokens [num, T], index state at the end [num])``."""
    eos = base_q.shape[-1] - 1
    only_eos = jnp.arange(base_q.shape[-1]) == eos

    def body(carry, inputs):
        b, o, done = carry
        t, step_key = inputs
        keep = jnp.where(t == horizon - 1, only_eos, mask[o])
        token = masked_sample(step_key, base_q, b, keep)
        token = jnp.where(done, eos, token)
        new_o = jnp.where(done, o, delta[o, token])
        return (base_delta[b, token], new_o, done | (token == eos)), token

    start = (jnp.full(num, base_start), jnp.full(num, oc_start), jnp.zeros(num, bool))
    keys = jax.random.split(key, horizon)
    (_, o, _), tokens = jax.lax.scan(body, start, (jnp.arange(horizon), keys))
    return tokens.T, o


# -- timing --------------------------------------------------------------------------------------


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


# -- one case: base × DFA ------------------------------------------------------------------------


class Peer(NamedTuple):
    """outlines-core's index over the vocabulary, and its dense tables (``outlines_tables``)."""

    index: Index
    dense: dict
    mask: np.ndarray
    delta: np.ndarray
    final: np.ndarray
    start: int


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


def dp_and_decodes(label, base, dfa, peer, texts, args, rows):
    """``(arm, exact samples [B, T], log P_base(accepted))``: the DP, then B exact samples (all
    valid, asserted) and B mask-only ones (their valid share), each decode timed."""
    B, T = args.batch, base.space.horizon
    ebm = base.constrain(dfa)
    _, t_dp = once(lambda: sp.to_arm(ebm).params)
    arm = sp.to_arm(ebm)  # the q cached by the call above: no second DP
    S, A = arm.lattice.num_states, base.space.num_actions
    rows.append((label, f"DP: sp.to_arm(base.constrain(dfa)), q [{T}, {S}, {A}] (incl. XLA "
                 "compile)", S, t_dp, None))  # fmt: skip
    key = jax.random.key(0)
    sample = jax.jit(lambda d, k: d.sample(k, (B,)))
    y, t_first = once(lambda: sample(arm, key))
    t_exact = statistics.median(once(lambda: sample(arm, key))[1] for _ in range(args.decodes))
    bad = [d for d in bpe.detokenize(texts, np.asarray(y)) if not valid_document(d)]
    assert not bad, f"exact samples outside the schema: {bad[:3]}"
    tables = [jnp.asarray(a) for a in (base.params, base.lattice.delta, peer.mask, peer.delta)]
    start = (base.lattice.initial, peer.start)
    decode = jax.jit(lambda k: mask_decode(k, *tables[:2], start[0], *tables[2:], start[1], B, T))
    (y_mask, end), _ = once(lambda: decode(key))
    t_mask = statistics.median(once(lambda: decode(key))[1] for _ in range(args.decodes))
    valid = np.array([valid_document(d) for d in bpe.detokenize(texts, np.asarray(y_mask))])
    assert (valid == peer.final[np.asarray(end)]).all(), "mask-only validity ≠ final state"
    rows += [
        (label, f"exact sampling, {B} seqs (compile+first)", "-", t_first, None),
        (label, f"exact sampling, {B} seqs: arm.sample (jit), median of {args.decodes}; all "
         "valid", "-", t_exact, t_exact / (B * T)),
        (label, f"mask-only sampling, {B} seqs: vectorised lax.scan (jit); {valid.mean():.1%} "
         f"valid; exact / this {t_exact / t_mask:.2f}", "-", t_mask, t_mask / (B * T)),
    ]  # fmt: skip
    return arm, y, float(ebm.log_partition())


def check_supports(arm, base, dfa, peer, guides, at, t):
    """Asserts the support rules of the module docstring; returns seqppl's myopic mask
    ``[B, A]`` of the batch (the DFA's allowed tokens after each prefix)."""
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
    finite = np.asarray(arm.params[t][at["product"]]) > -np.inf
    assert finite.any(-1).all() and not (finite & ~allowed).any(), "exact support ⊄ allowed"
    first = myopic[0, dfa.initial]  # the first decision
    assert (peer.mask[peer.start] == first).all(), "first step: outlines ≠ DFA allowed"
    p_base = np.exp(np.asarray(base.params, np.float64)[base.lattice.initial])
    expected = np.where(first, p_base, 0.0) / np.where(first, p_base, 0.0).sum()
    logits = jnp.asarray(base.params[base.lattice.initial])[None]
    got = jax.nn.softmax(jnp.where(first, logits, -jnp.inf))[0]  # what the mask-only step draws
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-9)
    q0 = np.asarray(arm.params[0, arm.lattice.initial_state()])
    assert not ((q0 > -np.inf) & ~first).any(), "exact first step ⊄ allowed"
    return allowed


def step_variants(arm, base, peer, guides, at, t, eos):
    """``{name: (run, reset)}``: one decoding step of the batch ``at`` by each decoder."""
    B, A = len(guides), arm.space.num_actions
    key = jax.random.key(1)
    q_t, delta = arm.params[t], jnp.asarray(arm.lattice.delta)
    cdf_t = jnp.cumsum(jnp.exp(jax.nn.log_softmax(q_t, -1)), -1)  # [S, A], once (untimed)
    base_q = jnp.asarray(base.params)
    s, b, o = (jnp.asarray(at[k]) for k in ("product", "base", "oc"))
    mask, oc_delta = jnp.asarray(peer.mask), jnp.asarray(peer.delta)

    @jax.jit
    def seqppl_step(d, s, k):  # the body of the table ARM's sampling scan
        _, next_logits, advance = d.decoder(s.shape)
        token, _ = draw_step(k, next_logits(s, t), t, jnp.zeros(s.shape, bool), d.space)
        return token, advance(s, token, t)

    @jax.jit
    def plain_exact(q, s, k):
        token = plain_sample(k, q[s])
        return token, delta[s, token]

    @jax.jit
    def cdf_exact(cdf, s, k):  # a row gather and a compare-count: nothing normalised per step
        rows = cdf[s]
        u = 1.0 - jax.random.uniform(k, s.shape, rows.dtype)
        token = jnp.sum(rows < (u * rows[:, -1])[:, None], -1, dtype=jnp.int32)
        return token, delta[s, token]

    moved = np.zeros(B, bool)

    def engine_step(fill):
        buffer = np.zeros((B, (A + 31) // 32), np.int32) if fill else np.zeros((B, A), bool)
        for i, g in enumerate(guides):
            if fill:
                g.write_mask_into(buffer[i].ctypes.data, buffer.shape[1], 4)
            else:
                buffer[i, g.get_tokens()] = True
        draw = bitmask_sample if fill else masked_sample
        tokens = np.asarray(draw(key, base_q, b, jnp.asarray(buffer)))
        moved[:] = tokens != eos  # vLLM never advances a guide on EOS
        for g, token in zip(np.array(guides)[moved], tokens[moved].tolist(), strict=True):
            g.advance(token, return_tokens=False)
        return tokens

    def rollback():  # untimed: back to the batch's prefixes
        for g in np.array(guides)[moved]:
            g.rollback_state(1)
        assert [peer.dense[g.get_state()] for g in guides] == list(at["oc"])

    def nothing():
        pass

    return {
        "exact, seqppl table ARM step (jit)": (lambda: seqppl_step(arm, s, key), nothing),
        "exact, plain jnp row gather + sampler (jit)": (lambda: plain_exact(q_t, s, key), nothing),
        "exact, precomputed CDF rows: gather + compare-count (jit)": (
            lambda: cdf_exact(cdf_t, s, key), nothing),
        "mask-only, vectorised [S_oc, A] mask table (jit)": (
            lambda: table_mask_step(key, base_q, b, mask, oc_delta, o), nothing),
        "mask-only, vLLM: Guide.write_mask_into per seq + jit mask/sample + advance": (
            lambda: engine_step(True), rollback),
        "mask-only, outlines: Guide.get_tokens() list per seq + jit mask/sample + advance": (
            lambda: engine_step(False), rollback),
    }  # fmt: skip


def run_case(label, tok, order, text, args, rows, steps):
    """(a)–(d) for one base over one vocabulary; returns the figures printed above the tables."""
    texts = bpe.token_texts(tok)
    space = sp.SequenceSpace(vocab_size=len(texts), length=args.length, eos=True)
    dfa, peer = compile_case(space, texts, rows)
    base = bpe.ngram_base(tok, space, order, method="counts", text=text)
    arm, y, log_z = dp_and_decodes(label, base, dfa, peer, texts, args, rows)
    lengths = np.asarray((y < space.eos_id).sum(-1))
    t = int(min(args.step_at, lengths.min() - 1))  # every sequence is still in flight at t
    prefix = np.asarray(y[:, :t])
    guides = [Guide(peer.index, max_rollback=1) for _ in range(args.batch)]
    for g, row in zip(guides, prefix.tolist(), strict=True):
        for token in row:
            g.advance(token, return_tokens=False)
    at = {
        "product": np.asarray(arm.lattice.states(y)[:, t]),
        "dfa": np.asarray(dfa.states(y)[:, t]),
        "base": np.asarray(base.lattice.states(y)[:, t]),
        "oc": np.array([peer.dense[g.get_state()] for g in guides], np.int32),
    }
    walked = np.full(args.batch, peer.start, np.int32)
    for column in prefix.T:
        walked = peer.delta[walked, column]
    assert (walked == at["oc"]).all(), "the index table and the Guides disagree on the state"
    allowed = check_supports(arm, base, dfa, peer, guides, at, t)
    variants = step_variants(arm, base, peer, guides, at, t, space.eos_id)
    for name, (run, reset) in variants.items():  # every drawn token is allowed
        out = run()
        drawn = np.asarray(out[0] if isinstance(out, tuple) else out)
        reset()
        assert allowed[np.arange(args.batch), drawn].all(), f"{name} drew a masked token"
    timed = alternate(variants, args.repeats)
    reference = timed["exact, seqppl table ARM step (jit)"][1]
    for name, (median, times) in timed.items():
        ratio = statistics.median(e / m for e, m in zip(reference, times, strict=True))
        steps.append((label, name, median, median / args.batch, ratio))
    S_dfa = dfa.num_states
    return dict(V=space.vocab_size, S=arm.lattice.num_states, S_dfa=S_dfa, T=space.horizon, t=t,
                log_z=log_z, rss=peak_rss_gb())  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    args.batch, args.length, args.step_at = (64, 32, 6) if args.tiny else (1024, 32, 6)
    args.decodes = 1 if args.tiny else 3
    max_files, big, small = (40, 160, 128) if args.tiny else (None, 32_000, 512)
    text = corpus.stdlib_docstrings(max_files)[0]
    rows, steps, info = [], [], []
    for vocab, order in ((big, 0), (small, 1)):
        tok = bpe.corpus_tokenizer(vocab, text=text)
        label = f"{('unigram', 'bigram')[order]} × DFA, V={tok.get_vocab_size()}"
        info.append((label, run_case(label, tok, order, text, args, rows, steps)))
        gc.collect()
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, device {device.platform} ({device.device_kind}), float32, "
          f"B={args.batch}, L={args.length}, repeats={args.repeats}\n")  # fmt: skip
    for label, d in info:
        print(f"- {label}: S_dfa={d['S_dfa']}, product S={d['S']}, T={d['T']}, step at "
              f"t={d['t']}, log P_base(accepted)={d['log_z']:.2f}, peak RSS so far "
              f"{d['rss']:.2f} GiB")  # fmt: skip
    V, S_dfa, T = (info[0][1][k] for k in ("V", "S_dfa", "T"))
    print(f"- a dense bigram × DFA at V={V} would need q [T, (V+1)·S_dfa, V+1] of "
          f"{dense_bigram_bytes(V, S_dfa, T) / 2**30:,.1f} GiB (float32): not run\n")  # fmt: skip
    print("| case | work | states | time (s) | per token (µs) |\n|---|---|---|---|---|")
    for case, work, states, seconds, per_token in rows:
        cell = "-" if per_token is None else f"{per_token * 1e6:.2f}"
        print(f"| {case} | {work} | {states} | {seconds:.3f} | {cell} |")
    print(f"\n| case | one decoding step of B={args.batch} in flight | step (ms) | per token (µs) "
          "| exact (seqppl) / this |\n|---|---|---|---|---|")  # fmt: skip
    for case, name, seconds, per_token, ratio in steps:
        print(f"| {case} | {name} | {seconds * 1e3:.2f} | {per_token * 1e6:.2f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
