"""A BPE token vocabulary for the stdlib docstring corpus, and an n-gram base ARM over it.

``corpus_tokenizer`` trains a ``tokenizers`` BPE on the training split of
``seqppl.models.corpus`` (no download), caches it as JSON and reloads it. Token texts are plain
substrings (no byte-level markers): a token sequence means the concatenation of its tokens'
texts, ``text(y) = token_texts[y_0] + token_texts[y_1] + ...`` (EOS adds nothing), which is what
``tokenizer.decode`` returns. ``ngram_base`` fits a table ARM on ``Lattice.markov(space, k)`` to
windows of the encoded corpus with ``sp.fit``, or by counts (``ngram_counts``, sparse): a lattice
base, so that base × constraint is exact.

The corpus is the running Python's standard library, so the vocabulary is deterministic for a
given Python version (and ``tokenizers`` version) but differs between versions.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import tokenizers
from seqppl.models.corpus import ALPHABET, stdlib_docstrings
from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers

import seqppl as sp

__all__ = [
    "train_tokenizer",
    "corpus_tokenizer",
    "default_cache_dir",
    "token_texts",
    "detokenize",
    "corpus_token_ids",
    "token_windows",
    "ngram_counts",
    "ngram_base",
]

# Pre-tokens: a word, number or punctuation run with at most one leading space; whitespace runs
# (GPT-2's split without its byte-level alphabet). Tokens never cross a pre-token boundary.
_PATTERN = r" ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+"
_NOT_IN_ALPHABET = r"[^\n -~]"  # printable ASCII and newline are kept; the rest becomes "?"
_RECIPE = f"bpe/1 {_PATTERN} {_NOT_IN_ALPHABET} tokenizers {tokenizers.__version__}"
_MAX_CELLS = 2**25  # largest n-gram table [S, A] ngram_base builds (a bigram at V ≈ 5,800)


def train_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """A BPE ``Tokenizer`` with at most ``vocab_size`` tokens trained on ``text`` (no cache).

    Ids ``0..95`` are ``corpus.ALPHABET`` (newline, then printable ASCII), then merges in the
    order learned. Characters outside the alphabet are normalised to ``?``; every other text
    round-trips: ``"".join(token_texts(tok)[i] for i in tok.encode(s).ids) == s``. Paragraphs
    (``text.split("\\n\\n")``) are the training sequences. Fewer than ``vocab_size`` tokens come
    back when every pre-token of ``text`` is already one token (see ``get_vocab_size()``).
    Training is deterministic (same text, same vocabulary).

    >>> tok = train_tokenizer("the cat and the hat\\n\\nthe end", vocab_size=100)
    >>> ids = tok.encode("the hat").ids
    >>> tok.get_vocab_size(), [token_texts(tok)[i] for i in ids], tok.decode(ids)
    (100, ['the', ' ', 'h', 'at'], 'the hat')
    """
    if not isinstance(vocab_size, int) or vocab_size < len(ALPHABET):
        raise ValueError(f"vocab_size must be an int >= {len(ALPHABET)}, got {vocab_size!r}")
    tokenizer = Tokenizer(tokenizers.models.BPE())
    tokenizer.normalizer = normalizers.Replace(Regex(_NOT_IN_ALPHABET), "?")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(_PATTERN), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # decode = concatenation (the default joins with " ")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=list(ALPHABET),
        limit_alphabet=len(ALPHABET),
        special_tokens=[],
        show_progress=False,
    )
    tokenizer.train_from_iterator((p for p in text.split("\n\n") if p), trainer)
    return tokenizer


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/seqppl/bpe``, or ``~/.cache/seqppl/bpe`` when it is unset."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "seqppl" / "bpe"


def corpus_tokenizer(
    vocab_size: int = 256, *, max_files: int | None = None, text: str | None = None, cache_dir=None
) -> Tokenizer:
    """The BPE ``Tokenizer`` of the stdlib docstring corpus, trained once and cached.

    The file is ``cache_dir / f"bpe-{vocab_size}-{digest}.json"``, ``digest`` a SHA-256 of the
    training text and the recipe; it is reloaded when present (an unreadable one is retrained
    and replaced) and written atomically, so parallel workers may share a folder.

    Args:
        vocab_size: the largest vocabulary ``V`` (≥ 96, the character alphabet).
        max_files: build the corpus from the first ``max_files`` stdlib files (None: all;
            parsing the whole stdlib takes ~15 s, training on it 0.3 s at V=256).
        text: train on this text instead of the corpus (it is hashed for the cache key).
        cache_dir: a folder; default ``default_cache_dir()``.

    Returns:
        A ``Tokenizer`` with no special tokens; ``token_texts`` gives each id's text.
    """
    text = stdlib_docstrings(max_files)[0] if text is None else text
    digest = hashlib.sha256(f"{_RECIPE}\n{text}".encode()).hexdigest()[:20]
    folder = Path(default_cache_dir() if cache_dir is None else cache_dir)
    path = folder / f"bpe-{vocab_size}-{digest}.json"
    if path.is_file():
        try:
            return Tokenizer.from_file(str(path))
        except Exception:  # noqa: BLE001 (tokenizers raises bare Exception): retrain below
            pass
    tokenizer = train_tokenizer(text, vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    tokenizer.save(str(partial))
    os.replace(partial, path)
    return tokenizer


def token_texts(tokenizer: Tokenizer) -> list[str]:
    """The text ``[V]`` each id ``0..V-1`` contributes to a detokenised string.

    Exact for ``train_tokenizer`` / ``corpus_tokenizer`` tokenizers (their token strings are
    plain substrings). A tokenizer with special tokens is refused: they have no text.
    """
    special = tokenizer.get_added_tokens_decoder()
    if special:
        first = min(special)
        raise ValueError(
            f"tokenizer has {len(special)} special token(s) with no text "
            f"(id {first} = {special[first].content!r}); use a corpus_tokenizer"
        )
    texts = [tokenizer.id_to_token(i) for i in range(tokenizer.get_vocab_size())]
    missing = [i for i, t in enumerate(texts) if t is None]
    if missing:
        raise ValueError(f"tokenizer ids are not contiguous: id {missing[0]} has no token")
    return texts


def detokenize(texts, tokens):
    """The text of ``tokens`` int ``[..., T]``: ``str`` for ``[T]``, nested lists above.

    ``texts`` is ``token_texts(tokenizer)`` (``[V]``) or a tokenizer; EOS (id ``V``) ends the
    text. ``detokenize(texts, y) == "".join(texts[i] for i in y if i < V)``.
    """
    texts = token_texts(texts) if isinstance(texts, Tokenizer) else list(texts)
    y = np.asarray(tokens)
    if y.ndim == 0 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"tokens must be int [..., T], got dtype {y.dtype} shape {y.shape}")
    if y.ndim > 1:
        return [detokenize(texts, row) for row in y]
    bad = np.flatnonzero((y < 0) | (y > len(texts)))
    if bad.size:
        raise ValueError(f"tokens[{bad[0]}] = {y[bad[0]]} is not in [0, {len(texts)}]")
    eos = np.flatnonzero(y == len(texts))
    return "".join(texts[i] for i in y[: eos[0] if eos.size else len(y)])


def _split_text(text, max_files, split):
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if text is not None:
        return text
    return stdlib_docstrings(max_files)[split == "heldout"]


def corpus_token_ids(
    tokenizer: Tokenizer, text: str | None = None, *, max_files=None, split: str = "train"
) -> np.ndarray:
    """The encoded corpus ``ids`` int32 ``[N]`` (``text``, else the ``split`` of the stdlib
    corpus from ``max_files`` files); ``detokenize(tokenizer, ids)`` is the normalised text."""
    text = _split_text(text, max_files, split)
    return np.asarray(tokenizer.encode(text).ids, np.int32)


def token_windows(
    tokenizer: Tokenizer,
    space: sp.SequenceSpace,
    text: str | None = None,
    *,
    max_files=None,
    split: str = "train",
    max_windows: int | None = None,
) -> np.ndarray:
    """Training sequences ``[N, T]`` of ``space`` cut from the encoded corpus (or ``text``).

    Fixed length (``eos=False``): non-overlapping windows of ``T = L`` tokens of the whole
    encoded text. With EOS: each paragraph (``text.split("\\n\\n")``) is encoded and cut into
    chunks of at most ``L`` tokens, each padded with EOS to ``T = L + 1``; a short last chunk
    thus ends with a real EOS (the paragraph ends), a full chunk with the forced one. Every
    chunk starts from the empty context, also the later chunks of a long paragraph.
    """
    texts = token_texts(tokenizer)
    if space.vocab_size != len(texts):
        raise ValueError(
            f"space.vocab_size = {space.vocab_size} differs from the tokenizer's {len(texts)}"
        )
    text = _split_text(text, max_files, split)
    L = space.length
    if not space.eos:
        ids = corpus_token_ids(tokenizer, text)
        windows = ids[: len(ids) // L * L].reshape(-1, L)
    else:
        rows = []
        for enc in tokenizer.encode_batch([p for p in text.split("\n\n") if p]):
            rows.extend(enc.ids[i : i + L] for i in range(0, len(enc.ids), L))
        windows = np.full((len(rows), space.horizon), space.eos_id, np.int32)
        for n, row in enumerate(rows):
            windows[n, : len(row)] = row
    return windows[:max_windows].astype(np.int32)


def ngram_counts(windows, space: sp.SequenceSpace, order: int = 1):
    """The n-gram counts ``c[s, a]`` of the decisions ``windows [N, T]`` make, sparse.

    Returns ``(states int64 [K], actions int32 [K], counts float64 [K])``: each (state, action)
    pair seen once, sorted by state then action (CSR order), with ``s`` the context of
    ``Lattice.markov(space, order)``: the last ``k = order`` tokens, start-padded with ``V``,
    ``s = Σ_j z_j (V+1)^(k−1−j)`` oldest first. The decisions counted are those the data makes:
    with EOS, none after the first EOS nor the forced last one. No ``[S, A]`` table is built,
    so a bigram at V = 26,840 costs its ``K`` pairs (141,171 on the stdlib corpus).
    """
    windows = space.validate(windows, "windows").astype(np.int64)
    if windows.ndim != 2:
        raise ValueError(f"windows must be int [N, {space.horizon}], got shape {windows.shape}")
    V, T = space.vocab_size, space.horizon
    made = np.array(space.active(windows))  # the decisions up to the first EOS
    if space.eos:
        made[:, -1] = False
    padded = np.concatenate([np.full((len(windows), order), V, np.int64), windows], 1)
    states = np.zeros(windows.shape, np.int64)
    for j in range(order):
        states += padded[:, j : j + T] * (V + 1) ** (order - 1 - j)
    pairs, counts = np.unique(
        np.stack([states[made], windows[made]], 1), axis=0, return_counts=True
    )
    return pairs[:, 0], pairs[:, 1].astype(np.int32), counts.astype(np.float64)


def ngram_base(
    tokenizer: Tokenizer,
    space: sp.SequenceSpace,
    order: int = 1,
    *,
    key=None,
    steps: int = 300,
    learning_rate: float = 0.1,
    batch_size: int = 256,
    method: str = "fit",
    pseudocount: float = 0.1,
    text: str | None = None,
    max_files: int | None = None,
    progress: bool = False,
) -> sp.ARM:
    """A table ``ARM`` on ``Lattice.markov(space, order)`` fit to ``token_windows`` of the corpus.

    ``method="fit"``: ``sp.fit`` (likelihood, Adam at ``learning_rate`` on the trapezoid
    schedule, minibatches of ``batch_size``) from the uniform table ``q = 0``; contexts never
    seen keep uniform rows. ``method="counts"``: the closed-form smoothed MLE
    ``q[s, a] = log(c[s, a] + pseudocount)`` with ``c`` the ``ngram_counts`` of the windows,
    instant; ``fit`` tends to it as ``steps`` grow.

    Args:
        tokenizer: a ``corpus_tokenizer``; ``space.vocab_size`` must equal its size ``V``.
        space: the ``SequenceSpace`` (``eos`` decides the windows, see ``token_windows``).
        order: the context length ``k`` (1: bigram, 2: trigram); ``S = (V+1)^k`` states.
        key: a PRNG key for ``sp.fit``'s minibatches (``method="fit"`` only).
        text, max_files: the training text (default: the train split of the stdlib corpus).

    Returns:
        ``sp.ARM.from_table(lattice, q)`` with ``q: float [S, A]``, every entry finite.

    >>> import jax
    >>> tok = train_tokenizer("a cat sat\\n\\na hat", vocab_size=98)
    >>> space = sp.SequenceSpace(vocab_size=98, length=4, eos=True)
    >>> arm = ngram_base(tok, space, text="a cat sat\\n\\na hat", method="counts")
    >>> arm.lattice.num_states, arm.sample(jax.random.key(0), (3,)).shape
    (99, (3, 5))
    """
    if method not in ("fit", "counts"):
        raise ValueError(f"method must be 'fit' or 'counts', got {method!r}")
    if not pseudocount > 0:
        raise ValueError(f"pseudocount must be > 0 (finite logits), got {pseudocount!r}")
    S = (space.vocab_size + 1) ** order
    if S * space.num_actions > _MAX_CELLS:
        raise ValueError(
            f"an order-{order} table over V={space.vocab_size} has {S} x {space.num_actions} "
            f"cells (limit {_MAX_CELLS}): use a smaller vocab_size or order"
        )
    windows = token_windows(tokenizer, space, text, max_files=max_files)
    if len(windows) == 0:
        raise ValueError(f"the text gives no window of {space.length} tokens")
    lattice = sp.Lattice.markov(space, order)
    if method == "counts":
        states, actions, counts = ngram_counts(windows, space, order)
        table = np.zeros((lattice.num_states, space.num_actions))
        table[states, actions] = counts
        return sp.ARM.from_table(lattice, jnp.log(table + pseudocount))
    if key is None:
        raise ValueError("method='fit' needs key= (a PRNG key); method='counts' does not")
    start = sp.ARM.from_table(lattice, jnp.zeros((lattice.num_states, space.num_actions)))
    trained, _ = sp.fit(
        start,
        windows,
        steps=steps,
        key=key,
        learning_rate=learning_rate,
        batch_size=batch_size,
        progress=progress,
    )
    return trained
