"""From a JSON Schema to exact samples, and what masking decoders get wrong, on a BPE vocabulary.

1. A BPE tokenizer trained on the stdlib docstring corpus (``seqppl.models.bpe``) and a bigram
   over its tokens, fit to the corpus with ``sp.fit``: the base ARM, on a lattice.
2. A JSON Schema compiled against the token texts by outlines-core (``sp.Lattice.json_schema``):
   a token DFA whose accepted sequences spell valid documents.
3. ``base.constrain(dfa)``: the base conditioned on validity; its ``log_partition()`` is
   ``log P_base(valid)``, and ``sp.to_arm`` of it is the exact lookahead decoder ``M`` on the
   product lattice bigram × DFA. Its samples are parsed back with ``json.loads``.
4. The decoders constrained-generation engines run, as ARMs on the same lattice
   (``sp.masked_arm``): myopic masking (only tokens that are dead now) and feasible masking
   (only tokens with an accepted completion within the length limit); ``sp.constraint_report``
   gives their distortion against the exact conditional, every figure exact.

    python examples/constrained_json.py [--quick] [--seed N]
"""

import argparse
import json
import time

import jax
from seqppl.models.bpe import corpus_tokenizer, detokenize, ngram_base, token_texts
from seqppl.models.corpus import stdlib_docstrings

import seqppl as sp

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 4}, "ok": {"type": "boolean"}},
    "required": ["name", "ok"],
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller corpus and vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit and every draw")
    args = parser.parse_args(argv)
    key = jax.random.key(args.seed)
    vocab, files, length = (128, 40, 22) if args.quick else (256, 200, 26)

    started = time.perf_counter()
    text = stdlib_docstrings(files)[0]
    tokenizer = corpus_tokenizer(vocab, text=text)
    texts = token_texts(tokenizer)
    space = sp.SequenceSpace(len(texts), length, eos=True)
    base = ngram_base(tokenizer, space, 1, key=key, steps=100 if args.quick else 300, text=text)
    print(
        f"BPE vocabulary: {len(texts)} tokens; bigram fit in {time.perf_counter() - started:.1f} s"
    )

    started = time.perf_counter()
    dfa = sp.Lattice.json_schema(space, SCHEMA, tokenizer)
    print(f"schema compiled: {dfa.num_states} DFA states in {time.perf_counter() - started:.2f} s")

    started = time.perf_counter()
    conditioned = base.constrain(dfa)
    log_p = float(conditioned.log_partition())
    exact = sp.to_arm(conditioned)
    print(f"log P_base(valid JSON within {length} tokens) = {log_p:.4f}")
    if log_p == float("-inf"):
        raise SystemExit("no valid document fits the length limit: raise it")
    seconds = time.perf_counter() - started
    print(f"exact M on {exact.lattice.num_states} product states: {seconds:.1f} s")

    draws = exact.sample(jax.random.fold_in(key, 1), (1000,))
    documents = detokenize(texts, draws)
    parsed = [json.loads(doc) for doc in documents]
    valid = all(set(d) == {"name", "ok"} and isinstance(d["ok"], bool) for d in parsed)
    print(f"1000 exact samples, all valid under the schema: {valid}")
    for doc in documents[:3]:
        print(f"  {doc!r}")

    print(f"\n{'decoder':>10} {'KL(dec‖target)':>15} {'KL(target‖dec)':>15} {'P(invalid)':>11} "
          f"{'P(runaway)':>11} {'E[length]':>10}")  # fmt: skip
    decoders = {mode: sp.masked_arm(base, dfa, mode) for mode in ("myopic", "feasible")}
    for name, decoder in {**decoders, "exact M": exact}.items():
        report = sp.constraint_report(decoder, base, dfa)
        kls = f"{report.kl_reverse:15.4f} {report.kl_forward:15.4f}"
        ends = f"{report.p_invalid:11.4f} {report.p_length_limit:11.4f}"
        print(f"{name:>10} {kls} {ends} {report.expected_length:10.2f}")
    print(f"target expected length: {report.target_expected_length:.2f} tokens")


if __name__ == "__main__":
    main()
