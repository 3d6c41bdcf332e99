"""Constrained decoding at a real vocabulary: a JSON Schema against the ~27k-token corpus BPE,
the exact DP on base × token DFA, batched exact sampling, and the exact lookahead step per token
against the mask-only step of engines (outlines-core's allowed tokens + masking), in one run.

(a) Compile ``SCHEMA`` (outlines-core's default whitespace ``[ ]?``) with ``sp.Lattice.json_schema``
(pruned, minimised token DFA) and, separately, outlines-core's own ``Index`` on the plain pattern
(what engines build). (b) Bases fit by counts on the corpus (``bpe.ngram_base(..., method=
"counts")``, pseudocount 0.1), each: the DP (one call, XLA compilation included), ``arm.sample``
of B sequences (every one asserted a valid document) and the vectorised mask-only decoder over
the same horizon with the same base (its share of valid documents):

- bigram × DFA, factored, at 27k: ``models.bigram_dfa`` (the soft values ``V_t [V+1, Q]`` by a
  sparse product per decision, never ``[T, S, A]``; the ARM builds each row from ``G_t[q]`` and
  the bigram's CSR slice by cached steps); the mask-only peers rebuild the same bigram rows by
  the same CSR scatter (``SparseBigramBase``);
- unigram × DFA at 27k (Markov(0): the product has the DFA's states, so ``sp.to_arm`` fits);
- bigram × DFA, dense, at V = 512 (``sp.to_arm`` on the product lattice, peak RSS ≈ 10 GiB; at
  27k q alone would be ``dense_bigram_bytes`` ≈ 6 TiB); the factored log Z is asserted equal.

(c) One decoding step of the same B sequences in flight (prefixes of the exact samples, all at
decision ``t``; none finished), by:

- exact, seqppl: the ARM's decode step, the body of its sampler's scan (``arm.decoder`` +
  ``draw_step``); jitted. For a table ARM: the row ``q[t, s]`` of each sequence's product state,
  normalised, one draw by inverse CDF, δ (at the full sizes q exceeds ``PRECOMPUTED_CDF_MAX``,
  so rows are normalised per step, as in ``arm.sample``; under ``--tiny`` the unigram table is
  small enough that the step re-derives the sampler's precomputed CDF table on every call, so
  tiny ratios mean nothing). For the factored ARM: the draw from the current logits, then the
  cached step (DFA and context advanced, the next row built);
- exact, plain jnp: the same rows with ``plain_sample`` (the lookahead alone); jitted;
- exact, precomputed CDF rows (tables): ``cumsum softmax q[t]`` once, then a row gather and a
  compare-count per step (what seqppl's sampler does for tables below ``PRECOMPUTED_CDF_MAX``);
- mask-only: vectorised, vLLM and outlines-list routes (``constraints_peers``).

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

    python benchmarks/bench_constraints.py          # 27k factored bigram + unigram, V=512 (~7 min)
    python benchmarks/bench_constraints.py --tiny   # seconds: the smoke run of make test-all
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from constraints_peers import (
    SparseBigramBase,
    TableBase,
    alternate,
    check_supports,
    compile_case,
    engine_variants,
    guides_at,
    mask_decode,
    once,
    peak_rss_gb,
    plain_sample,
    table_mask_step,
    valid_document,
)
from seqppl.models import bpe, corpus
from seqppl.models.bigram_dfa import bigram_counts, factored_dp

import seqppl as sp
from seqppl.distributions.ancestral import draw_step

SEQPPL_STEP = "exact, seqppl ARM step: decoder + draw_step (jit)"


def dense_bigram_bytes(vocab: int, num_dfa: int, horizon: int) -> float:
    """float32 bytes of the bigram × DFA logits table ``q [T, (V+1)·S_dfa, V+1]``."""
    return 4.0 * horizon * (vocab + 1) * num_dfa * (vocab + 1)


def decodes(label, arm, base, base_start, peer, texts, args, rows):
    """Exact samples ``[B, T]``: ``arm.sample`` of B (all valid, asserted) and the vectorised
    mask-only decoder with ``base`` (its valid share), timed alternately after a first call."""
    B, T = args.batch, arm.space.horizon
    key = jax.random.key(0)
    sample = jax.jit(lambda d, k: d.sample(k, (B,)))
    y, t_first = once(lambda: sample(arm, key))
    bad = [d for d in bpe.detokenize(texts, np.asarray(y)) if not valid_document(d)]
    assert not bad, f"exact samples outside the schema: {bad[:3]}"
    tables = jnp.asarray(peer.mask), jnp.asarray(peer.delta)
    decode = lambda: mask_decode(key, base, base_start, *tables, peer.start, B, T)  # noqa: E731
    (y_mask, end), _ = once(decode)
    rounds = [(once(lambda: sample(arm, key))[1], once(decode)[1]) for _ in range(args.decodes)]
    t_exact, t_mask = (statistics.median(ts) for ts in zip(*rounds, strict=True))
    ratio = statistics.median(e / m for e, m in rounds)  # alternated, as the steps are
    valid = np.array([valid_document(d) for d in bpe.detokenize(texts, np.asarray(y_mask))])
    assert (valid == peer.final[np.asarray(end)]).all(), "mask-only validity ≠ final state"
    rows += [
        (label, f"exact sampling, {B} seqs (compile+first)", "-", t_first, None),
        (label, f"exact sampling, {B} seqs: arm.sample (jit), median of {args.decodes}; all "
         "valid", "-", t_exact, t_exact / (B * T)),
        (label, f"mask-only sampling, {B} seqs: vectorised lax.scan (jit); {valid.mean():.1%} "
         f"valid; exact / this {ratio:.2f}", "-", t_mask, t_mask / (B * T)),
    ]  # fmt: skip
    return y


@functools.partial(jax.jit, static_argnames="batch")
def arm_step(d, state, key, t, batch):
    """The body of an ARM's sampling scan at decision ``t``: ``(token, next state)``."""
    _, next_logits, advance = d.decoder((batch,))
    token, _ = draw_step(key, next_logits(state, t), t, jnp.zeros(batch, bool), d.space)
    return token, advance(state, token, t)


def timed_steps(label, variants, at, args, steps):
    """Asserts that every variant draws allowed tokens (``at["allowed"]``), then times them
    alternately; appends ``(label, name, median, per token, seqppl's time / this)`` rows."""
    for name, (run, reset) in variants.items():
        out = run()
        drawn = np.asarray(out[0] if isinstance(out, tuple) else out)
        reset()
        assert at["allowed"][np.arange(args.batch), drawn].all(), f"{name} drew a masked token"
    timed = alternate(variants, args.repeats)
    reference = timed[SEQPPL_STEP][1]
    for name, (median, times) in timed.items():
        ratio = statistics.median(e / m for e, m in zip(reference, times, strict=True))
        steps.append((label, name, median, median / args.batch, ratio))


def in_flight(y, dfa, peer, args):
    """``(t, prefix [B, t], guides, at)``: the batch at decision ``t`` (every sequence still in
    flight), outlines-core Guides advanced along it, each sequence's DFA and index states."""
    lengths = np.asarray((y < dfa.space.eos_id).sum(-1))
    t = int(min(args.step_at, lengths.min() - 1))
    prefix = np.asarray(y[:, :t])
    guides, oc = guides_at(peer, prefix)
    return t, prefix, guides, {"dfa": np.asarray(dfa.states(y)[:, t]), "oc": oc}


# -- dense: sp.to_arm on the product lattice -----------------------------------------------------


def dense_case(label, base, dfa, peer, texts, args, rows, steps):
    """The DP ``sp.to_arm(base.constrain(dfa))`` (a table ``q [T, S, A]``), the decodes and the
    steps; returns ``(product states, log P_base(accepted))``."""
    ebm = base.constrain(dfa)
    _, t_dp = once(lambda: sp.to_arm(ebm).params)
    arm = sp.to_arm(ebm)  # the q cached by the call above: no second DP
    S, A, T = arm.lattice.num_states, base.space.num_actions, base.space.horizon
    rows.append((label, f"DP: sp.to_arm(base.constrain(dfa)), q [{T}, {S}, {A}] (incl. XLA "
                 "compile)", S, t_dp, None))  # fmt: skip
    table = TableBase(jnp.asarray(base.params), jnp.asarray(base.lattice.delta))
    y = decodes(label, arm, table, base.lattice.initial, peer, texts, args, rows)
    t, _, guides, at = in_flight(y, dfa, peer, args)
    s, b = (np.asarray(lat.states(y)[:, t]) for lat in (arm.lattice, base.lattice))
    first_rows = (base.lattice.initial, np.asarray(base.params, np.float64)[base.lattice.initial],
                  arm.params[0, arm.lattice.initial_state()])  # fmt: skip
    at["allowed"] = check_supports(dfa, peer, guides, at, t, table, first_rows, arm.params[t][s])
    key, q_t, delta = jax.random.key(1), arm.params[t], jnp.asarray(arm.lattice.delta)
    cdf_t = jnp.cumsum(jnp.exp(jax.nn.log_softmax(q_t, -1)), -1)  # [S, A], once (untimed)
    s, b, o = jnp.asarray(s), jnp.asarray(b), jnp.asarray(at["oc"])
    mask, oc_delta = jnp.asarray(peer.mask), jnp.asarray(peer.delta)

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

    nothing = lambda: None  # noqa: E731
    variants = {
        SEQPPL_STEP: (lambda: arm_step(arm, s, key, t, args.batch), nothing),
        "exact, plain jnp row gather + sampler (jit)": (lambda: plain_exact(q_t, s, key), nothing),
        "exact, precomputed CDF rows: gather + compare-count (jit)": (
            lambda: cdf_exact(cdf_t, s, key), nothing),
        "mask-only, vectorised [S_oc, A] mask table (jit)": (
            lambda: table_mask_step(key, table, b, mask, oc_delta, o), nothing),
        **engine_variants(guides, peer, table, b, base.space.eos_id),
    }  # fmt: skip
    timed_steps(label, variants, at, args, steps)
    return S, float(ebm.log_partition())


# -- factored: models.bigram_dfa -----------------------------------------------------------------


def timed_dp(counts, dfa):
    """``(factored_dp(counts, dfa), seconds)``, XLA compilation included."""
    (fact, _), seconds = once(lambda: (fact := factored_dp(counts, dfa), fact.values))
    return fact, seconds


def factored_case(label, tok, text, dfa, peer, texts, args, rows, steps):
    """The factored DP of the counts bigram × DFA, the decodes and the steps; returns
    ``(bytes of the DP's arrays, log P_base(accepted))``."""
    space = dfa.space
    windows = bpe.token_windows(tok, space, text)
    counts, t_counts = once(lambda: bigram_counts(windows, space))
    rows.append((label, f"bigram counts, CSR [{space.num_actions}, {space.num_actions}] "
                 f"(bpe.ngram_counts of {len(windows)} windows)", len(counts.counts), t_counts,
                 None))  # fmt: skip

    fact, t_dp = timed_dp(counts, dfa)
    T, Q, A = space.horizon, dfa.num_states, space.num_actions
    nbytes = fact.values.nbytes + fact.continuation.nbytes
    rows.append((label, f"DP, factored: V [{T}, {A}, {Q}] + G [{T}, {Q}, {A}] "
                 f"({nbytes / 2**20:.0f} MiB; incl. XLA compile)", A * Q, t_dp, None))  # fmt: skip
    arm, base = fact.exact_arm(), SparseBigramBase(fact.rows)
    y = decodes(label, arm, base, space.vocab_size, peer, texts, args, rows)
    t, prefix, guides, at = in_flight(y, dfa, peer, args)
    start, next_logits, advance = arm.decoder((args.batch,))
    state = start
    for i, column in enumerate(prefix.T):  # the exact decoder's cache at decision t (untimed)
        state = advance(state, jnp.asarray(column), i)
    assert (np.asarray(state[1][1]) == at["dfa"]).all(), "the cache's DFA states are wrong"
    b = jnp.asarray(prefix[:, -1] if t else np.full(args.batch, space.vocab_size), jnp.int32)
    first_rows = (space.vocab_size, counts.dense_row(space.vocab_size), start[0][0])
    at["allowed"] = check_supports(dfa, peer, guides, at, t, base, first_rows, state[0])
    key, fn, (s, q, _) = jax.random.key(1), arm.logits_fn, state[1]
    o, mask, oc_delta = (jnp.asarray(a) for a in (at["oc"], peer.mask, peer.delta))

    @jax.jit
    def plain_exact(params, s, q, k):  # the same row, plain_sample, the advance
        token = plain_sample(k, fn.logits(params, s, q, t))
        return token, params["delta"][q, token]

    nothing = lambda: None  # noqa: E731
    variants = {
        SEQPPL_STEP: (lambda: arm_step(arm, state, key, t, args.batch), nothing),
        "exact, plain jnp: the same row (G + CSR scatter) + sampler (jit)": (
            lambda: plain_exact(arm.params, s, q, key), nothing),
        "mask-only, vectorised [S_oc, A] mask table, CSR bigram rows (jit)": (
            lambda: table_mask_step(key, base, b, mask, oc_delta, o), nothing),
        **engine_variants(guides, peer, base, b, space.eos_id),
    }  # fmt: skip
    timed_steps(label, variants, at, args, steps)
    return nbytes, float(fact.log_partition)


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
    for vocab in (big, small):
        tok = bpe.corpus_tokenizer(vocab, text=text)
        texts = bpe.token_texts(tok)
        space = sp.SequenceSpace(vocab_size=len(texts), length=args.length, eos=True)
        dfa, peer = compile_case(space, texts, rows)
        V = f"V={space.vocab_size}"
        if vocab == big:
            label = f"bigram × DFA, factored, {V}"
            nbytes, log_z = factored_case(label, tok, text, dfa, peer, texts, args, rows, steps)
            info.append(f"{label}: S_dfa={dfa.num_states}, DP arrays {nbytes / 2**20:.0f} MiB, "
                        f"log P_base(accepted)={log_z:.2f}, peak RSS so far {peak_rss_gb():.2f} "
                        "GiB")  # fmt: skip
            gib = dense_bigram_bytes(space.vocab_size, dfa.num_states, space.horizon) / 2**30
            dense = (f"a dense bigram × DFA at {V} would need q [T, (V+1)·S_dfa, V+1] of "
                     f"{gib:,.1f} GiB (float32): not run")  # fmt: skip
        order = 0 if vocab == big else 1
        label = f"{('unigram', 'bigram')[order]} × DFA, {V}"
        base = bpe.ngram_base(tok, space, order, method="counts", text=text)
        S, log_z = dense_case(label, base, dfa, peer, texts, args, rows, steps)
        info.append(
            f"{label}: S_dfa={dfa.num_states}, product S={S}, T={space.horizon}, "
            f"log P_base(accepted)={log_z:.2f}, peak RSS so far {peak_rss_gb():.2f} GiB"
        )
        if vocab == small:  # the factored pass against the dense one
            counts = bigram_counts(bpe.token_windows(tok, space, text), space)
            fact, t_dp = timed_dp(counts, dfa)
            factored = float(fact.log_partition)
            np.testing.assert_allclose(factored, log_z, rtol=1e-4)
            rows.append((f"bigram × DFA, factored, {V}", "DP, factored (incl. XLA compile); "
                         f"log Z {factored:.4f} = dense {log_z:.4f}", "-", t_dp, None))  # fmt: skip
        gc.collect()
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, device {device.platform} ({device.device_kind}), float32, "
          f"B={args.batch}, L={args.length}, repeats={args.repeats}\n")  # fmt: skip
    for line in [*info, dense]:
        print(f"- {line}")
    print()
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
