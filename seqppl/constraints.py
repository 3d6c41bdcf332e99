"""Constraints from specifications: regular expressions and JSON Schema over a token vocabulary.

A token sequence stands for the concatenation of its tokens' texts (EOS adds nothing); the
constraint accepts it when that text fullmatches the pattern. outlines-core compiles the pattern
(Rust ``regex`` syntax; JSON Schema → pattern by ``build_regex_from_schema``) against the token
texts into a token-level DFA; this module turns its index into a dense transition table.

outlines-core 0.2.14 keeps a token's transition only if the state it reaches is not a
"delayed" match state of the byte DFA, which drops every transition that leaves an accepted
prefix through a non-accepted one (for ``(b|c)*b`` it forbids ``c`` after ``b``, so ``bcb`` is
rejected); and it refuses a pattern when some reachable state has no token at all (``ax|b`` over
``{a, b}``). So the pattern is compiled as ``(?:P)T|(?s:.)*E`` with two characters ``T`` and ``E``
that no token contains, given a token each: no prefix of a token sequence is then a match, so
every transition is kept; ``E`` continues every state; and a state accepts exactly when the
``T`` token leads from it to a full match. States from which no accepted text can be reached
are merged into one absorbing dead state (soft value −∞); a token whose text the pattern cannot
continue leads there.

Small helpers write the patterns people write by hand: ``literal``, ``options`` (a fixed list of
strings, ``select``-style), ``contains``, ``repeat`` (bounded repetitions) and ``dyck`` (balanced
brackets of bounded depth).
"""

from __future__ import annotations

import json

import numpy as np

__all__ = [
    "compile_regex",
    "accepting_mask",
    "co_reachable",
    "product_accepting",
    "json_schema_regex",
    "token_texts",
    "literal",
    "options",
    "contains",
    "repeat",
    "dyck",
    "TERMINATOR",
    "ESCAPE",
]

TERMINATOR, ESCAPE = "\U000f0000", "\U000f0001"
"""Private-use characters of the compiled pattern ``(?:P)TERMINATOR|(?s:.)*ESCAPE`` (see the
module docstring); a token text containing either is refused."""


def token_texts(tokens, vocab_size: int) -> list[str]:
    """The text of each token id ``0..V-1``: ``tokens`` a sequence of ``V`` strings, or a
    ``tokenizers.Tokenizer`` whose vocabulary has ``V`` ids (each id's text is
    ``tokenizer.decode([id])``: its detokenisation must be the concatenation of those texts)."""
    if hasattr(tokens, "decode") and hasattr(tokens, "get_vocab_size"):
        if tokens.get_vocab_size() != vocab_size:
            raise ValueError(
                f"tokens is a tokenizer of {tokens.get_vocab_size()} ids; the space has "
                f"vocab_size={vocab_size}"
            )
        return [tokens.decode([i], skip_special_tokens=False) for i in range(vocab_size)]
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of V token strings (or a tokenizer), not a str")
    texts = list(tokens)
    if len(texts) != vocab_size or not all(isinstance(t, str) for t in texts):
        raise ValueError(
            f"tokens must be {vocab_size} strings (one per token id), got {texts!r:.200}"
        )
    return texts


def compile_regex(pattern: str, texts: list[str]) -> tuple[np.ndarray, int, np.ndarray]:
    """``(delta int [S, V], initial, accepting bool [S])``: the DFA over token ids whose accepted
    sequences are those whose concatenated text fullmatches ``pattern``.

    State ``S − 1`` is the dead state (absorbing, never accepting); every other state can still
    reach acceptance. Tokens with empty text leave the state unchanged.

    Raises:
        ValueError: ``pattern`` is not a valid pattern, a token contains ``TERMINATOR``, or no
            token sequence is accepted.
    """
    from outlines_core import Index, Vocabulary

    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, got {type(pattern).__name__}")
    V = len(texts)
    ids: dict[str, list[int]] = {}
    for i, text in enumerate(texts):
        if TERMINATOR in text or ESCAPE in text:
            raise ValueError(f"token {i} contains a reserved character (U+F0000 or U+F0001)")
        if text:
            ids.setdefault(text, []).append(i)
    stop, escape, eos = V, V + 1, V + 2
    ids[TERMINATOR], ids[ESCAPE] = [stop], [escape]
    full = f"(?:{pattern}){TERMINATOR}|(?s:.)*{ESCAPE}"  # the escape: no state lacks a token
    try:
        index = Index(full, Vocabulary(eos, ids))
    except (ValueError, RuntimeError) as error:
        raise ValueError(f"pattern {pattern!r} could not be compiled: {error}") from None
    transitions = index.get_transitions()
    after_stop = index.get_final_states()  # full matches: only a terminator can end one
    names = sorted(s for s in transitions if s not in after_stop)
    dead = len(names)
    edges = [  # (tokens, outlines' target states) of each of our states
        (np.fromiter(out.keys(), np.int64, len(out)), np.fromiter(out.values(), np.int64, len(out)))
        for out in (transitions[name] for name in names)
    ]
    top = max(
        [index.get_initial_state(), *transitions, *(int(t.max()) for _, t in edges if t.size)]
    )
    dense = np.full(top + 1, dead, dtype=np.int64)  # outlines' state id -> ours (dead: pruned)
    dense[names] = np.arange(dead)
    delta = np.full((dead + 1, V), dead, dtype=np.int64)
    accepting = np.zeros(dead + 1, dtype=bool)
    for k, (name, (tokens, targets)) in enumerate(zip(names, edges, strict=True)):
        accepting[k] = transitions[name].get(stop) in after_stop  # the terminator ends a match
        keep = tokens < V
        delta[k, tokens[keep]] = dense[targets[keep]]  # pruned below if it cannot accept
    delta[:dead, [i for i, t in enumerate(texts) if not t]] = np.arange(dead)[:, None]
    initial = int(dense[index.get_initial_state()])
    live = co_reachable(delta, accepting)
    if not live[initial]:
        raise ValueError(f"no token sequence over this vocabulary matches {pattern!r}")
    delta = np.where(live[delta], delta, dead)
    delta[~live] = dead
    return _renumber(*_minimise(delta, initial, accepting & live))


def co_reachable(delta: np.ndarray, accepting: np.ndarray) -> np.ndarray:
    """bool ``[S]``: the states from which some accepting state is reachable through ``delta``
    int ``[S, V]`` (any number of steps; ``accepting`` bool ``[S]``)."""
    live = accepting.copy()
    while True:
        grown = live | live[delta].any(axis=1)
        if (grown == live).all():
            return live
        live = grown


def _minimise(delta: np.ndarray, initial: int, accepting: np.ndarray):
    """Moore's partition refinement: states with the same accepted continuations are merged;
    the dead state (last) keeps a block of its own, last. Returns ``(delta, initial,
    accepting)`` over the blocks."""
    block = accepting.astype(np.int64)
    block[-1] = 2
    count = len(np.unique(block))
    while True:
        signature = np.ascontiguousarray(np.concatenate([block[:, None], block[delta]], axis=1))
        ids: dict[bytes, int] = {}  # one block per distinct row, numbered as they first appear
        block = np.array([ids.setdefault(row.tobytes(), len(ids)) for row in signature])
        if block.max() + 1 == count:
            break
        count = block.max() + 1
    dead = block[-1]
    block = np.where(block == dead, count - 1, block - (block > dead))
    first = np.unique(block, return_index=True)[1]  # one state of each block
    return block[delta[first]], int(block[initial]), accepting[first]


def _renumber(delta, initial, accepting):
    """Keeps the states reachable from ``initial`` (in order of discovery) plus one dead state."""
    order, seen = [initial], {initial}
    dead = delta.shape[0] - 1
    for state in order:  # breadth first; each state's successors in order of first appearance
        targets, first = np.unique(delta[state], return_index=True)
        for target in targets[np.argsort(first)].tolist():
            if target != dead and target not in seen:
                seen.add(target)
                order.append(target)
    order = [s for s in order if s != dead] + [dead]
    new = np.empty(delta.shape[0], dtype=np.int64)
    new[order] = np.arange(len(order))
    return new[delta[order]], int(new[initial]), accepting[order]


def accepting_mask(accepting, num_states: int) -> np.ndarray:
    """bool ``[S]`` from accepting state ids or a bool ``[S]`` mask (``ValueError`` naming
    ``accepting`` otherwise)."""
    ids = np.atleast_1d(np.asarray(accepting))
    if ids.dtype == bool:
        if ids.shape != (num_states,):
            raise ValueError(f"a boolean accepting must have shape [{num_states}]")
        return ids.copy()
    accept = np.zeros(num_states, dtype=bool)
    if ids.size:
        if not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= num_states:
            raise ValueError(f"accepting must hold states in [0, {num_states - 1}], got {ids}")
        accept[ids] = True
    return accept


def product_accepting(a, b, first, second):
    """The accepting mask of a product lattice whose state ``k`` pairs ``first[k]`` and
    ``second[k]``: where each factor that has accepting states (``a``, ``b``; None) accepts."""
    if a is None and b is None:
        return None
    return (True if a is None else a[first]) & (True if b is None else b[second])


def json_schema_regex(schema, whitespace: str | None = None) -> str:
    """The pattern of JSON documents valid under ``schema`` (a dict or a JSON string), by
    outlines-core; ``whitespace`` is the pattern allowed between tokens of the JSON syntax
    (outlines-core's default ``[ ]?``; e.g. ``[ \\n\\t]*`` for whitespace-permissive output)."""
    from outlines_core.json_schema import build_regex_from_schema

    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        return build_regex_from_schema(text, whitespace)
    except (ValueError, TypeError) as error:
        raise ValueError(f"schema could not be compiled: {error}") from None


def literal(text: str) -> str:
    """A pattern matching exactly ``text`` (every character escaped)."""
    return "".join(c if c.isalnum() or c in " _" else _escape(c) for c in text)


def _escape(c: str) -> str:
    return f"\\x{{{ord(c):x}}}"


def options(strings) -> str:
    """A pattern matching exactly one of ``strings`` (an option set)."""
    strings = list(strings)
    if not strings or not all(isinstance(s, str) for s in strings):
        raise ValueError("options needs a non-empty list of strings")
    return "(?:" + "|".join(literal(s) for s in strings) + ")"


def contains(text: str, alphabet: str = "(?s:.)") -> str:
    """A pattern matching any text that contains ``text`` (``alphabet`` the pattern of one
    character elsewhere)."""
    return f"{alphabet}*{literal(text)}{alphabet}*"


def repeat(pattern: str, least: int, most: int | None = None) -> str:
    """``pattern`` repeated ``least`` to ``most`` times (``most=None``: unbounded)."""
    if least < 0 or (most is not None and most < least):
        raise ValueError(f"repeat needs 0 <= least <= most, got {least}, {most}")
    return f"(?:{pattern}){{{least},{'' if most is None else most}}}"


def dyck(max_depth: int, open: str = "(", close: str = ")") -> str:
    """Balanced ``open``/``close`` brackets nested at most ``max_depth`` deep (the empty text
    included): ``D_0 = ""``, ``D_k = (open D_{k−1} close)*``."""
    if max_depth < 0:
        raise ValueError(f"max_depth must be >= 0, got {max_depth}")
    inner = ""
    for _ in range(max_depth):
        inner = f"(?:{literal(open)}{inner}{literal(close)})*"
    return inner
