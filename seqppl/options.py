"""A DFA that accepts exactly the outputs that spell one of a list of options (``select``).

States are the prefixes of the options (a trie) reachable by tokens, plus one absorbing dead
state: ``δ(p, v) = p ⊕ text(v)`` when that is still a prefix of an option, else dead; the
accepting states are the options themselves. A token sequence spells the concatenation of its
tokens' texts (EOS adds nothing), so every tokenisation of an option is accepted. Options given
as token ids (sequences of ints) match those token sequences only.
"""

from __future__ import annotations

import numpy as np

from seqppl.constraints import token_texts
from seqppl.lattice import Lattice
from seqppl.space import SequenceSpace

__all__ = ["options_lattice"]


def options_lattice(space: SequenceSpace, options, tokens=None) -> Lattice:
    """The automaton accepting exactly the outputs that spell one of ``options``, with
    ``accepting`` set (a ``Lattice`` of kind ``"automaton"``; state 0 is the empty prefix).

    Args:
        space: the ``SequenceSpace``.
        options: a non-empty sequence of strings (which need ``tokens``), or of token-id
            sequences (ints in ``[0, V)``, no EOS).
        tokens: the text of each token id ``0..V-1``: a sequence of ``V`` strings or a
            ``tokenizers.Tokenizer`` (as for ``Lattice.regex``).

    Returns:
        the DFA; an option that no token sequence of the space can spell is never accepted.

    Example:
        >>> space = SequenceSpace(vocab_size=3, length=2, eos=True)
        >>> dfa = options_lattice(space, ["ab", "b"], tokens=["a", "b", "ab"])
        >>> dfa.num_states, np.flatnonzero(dfa.accepting).tolist()  # "", a, b, ab, dead
        (5, [2, 3])
    """
    if not isinstance(space, SequenceSpace):
        raise TypeError(f"space must be a SequenceSpace, got {type(space).__name__}")
    if isinstance(options, str) or not len(options := list(options)):
        raise ValueError(
            f"options must be a non-empty list of strings or token ids, got {options!r}"
        )
    if all(isinstance(o, str) for o in options):
        if tokens is None:
            raise ValueError("string options need tokens= (the text of each token id)")
        units = token_texts(tokens, space.vocab_size)
        empty = ""
    else:
        options = [_token_ids(o, i, space.vocab_size) for i, o in enumerate(options)]
        units = [(v,) for v in range(space.vocab_size)]
        empty = ()
    prefixes = {o[:k] for o in options for k in range(len(o) + 1)}
    index, order, rows = {empty: 0}, [empty], []
    for prefix in order:  # breadth first from the empty prefix
        row = []
        for unit in units:
            nxt = prefix + unit
            if nxt in prefixes and nxt not in index:
                index[nxt] = len(order)
                order.append(nxt)
            row.append(index.get(nxt, -1))
        rows.append(row)
    dead = len(order)
    delta = np.array(rows + [[dead] * space.vocab_size], dtype=np.int64)
    delta[delta < 0] = dead
    wanted = set(options)
    accepting = np.array([p in wanted for p in order] + [False])
    return Lattice.automaton(space, delta, 0, accepting=accepting)


def _token_ids(option, i: int, vocab_size: int) -> tuple[int, ...]:
    """An option given as token ids, as a tuple (``ValueError`` naming ``options[i]``)."""
    ids = np.asarray(option) if len(option) else np.zeros(0, np.int64)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"options[{i}] must be a string or a sequence of token ids, got {option!r}"
        )
    bad = (ids < 0) | (ids >= vocab_size)
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(
            f"options[{i}][{j}] = {int(ids[j])} is not a token id in [0, {vocab_size - 1}]"
        )
    return tuple(int(v) for v in ids)
