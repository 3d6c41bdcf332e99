"""seqppl.models.bpe: the corpus BPE vocabulary (round trip, determinism, cache) and the n-gram
base ARM fit on it (a lattice table ARM that beats the uniform ARM on held-out windows)."""

import random
import re

import jax
import numpy as np
import pytest
from seqppl.models.bpe import (
    corpus_token_ids,
    corpus_tokenizer,
    default_cache_dir,
    detokenize,
    ngram_base,
    token_texts,
    token_windows,
    train_tokenizer,
)
from seqppl.models.corpus import ALPHABET, stdlib_docstrings

import seqppl as sp

MAX_FILES = 50  # ~0.5 s of parsing; the tests train on this small corpus
VOCAB = 128


@pytest.fixture(scope="module")
def corpus():
    return stdlib_docstrings(MAX_FILES)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return corpus_tokenizer(VOCAB, max_files=MAX_FILES, cache_dir=tmp_path_factory.mktemp("bpe"))


def test_vocabulary_is_the_alphabet_then_merges_with_plain_texts(tokenizer):
    texts = token_texts(tokenizer)
    assert len(texts) == tokenizer.get_vocab_size() == VOCAB
    assert texts[: len(ALPHABET)] == list(ALPHABET)
    assert len(set(texts)) == VOCAB and all(len(t) > 1 for t in texts[len(ALPHABET) :])
    assert all(set(t) <= set(ALPHABET) for t in texts)  # no byte-level markers such as 'Ġ'
    assert any(" " in t and t.strip() for t in texts)  # spaces live inside tokens
    assert [tokenizer.decode([i]) for i in range(VOCAB)] == texts  # what Lattice.regex reads


def test_round_trip_on_random_corpus_lines(tokenizer, corpus):
    texts = token_texts(tokenizer)
    lines = [line for line in "\n".join(corpus).split("\n") if line]
    sample = random.Random(0).sample(lines, 200) + ["  two  spaces\n\n\nnewlines ", "é\tx"]
    for line in sample:
        ids = tokenizer.encode(line).ids
        normalised = tokenizer.normalizer.normalize_str(line)
        assert "".join(texts[i] for i in ids) == normalised == tokenizer.decode(ids)
        assert detokenize(texts, ids) == normalised
    assert tokenizer.normalizer.normalize_str("é\tx") == "??x"


def test_corpus_token_ids_detokenise_to_the_corpus(tokenizer, corpus):
    ids = corpus_token_ids(tokenizer, corpus[1])
    assert ids.dtype == np.int32 and ids.ndim == 1 and 0 < len(ids) < len(corpus[1])
    assert detokenize(tokenizer, ids) == tokenizer.normalizer.normalize_str(corpus[1])


def test_training_is_deterministic_across_cache_dirs(tmp_path, corpus):
    first = corpus_tokenizer(VOCAB, text=corpus[0], cache_dir=tmp_path / "a")
    second = corpus_tokenizer(VOCAB, text=corpus[0], cache_dir=tmp_path / "b")
    assert first.to_str() == second.to_str()
    assert token_texts(first) == token_texts(second)


def test_cache_is_written_once_and_reloaded(tmp_path, corpus):
    first = corpus_tokenizer(VOCAB, text=corpus[0], cache_dir=tmp_path)
    (path,) = tmp_path.glob("bpe-128-*.json")
    stamp = path.stat().st_mtime_ns
    second = corpus_tokenizer(VOCAB, text=corpus[0], cache_dir=tmp_path)
    assert path.stat().st_mtime_ns == stamp  # loaded, not retrained
    assert second.to_str() == first.to_str()
    corpus_tokenizer(VOCAB, text=corpus[0][:-1], cache_dir=tmp_path)  # another corpus: new key
    corpus_tokenizer(VOCAB + 1, text=corpus[0], cache_dir=tmp_path)
    assert len(list(tmp_path.glob("bpe-*.json"))) == 3
    path.write_text("not json")  # a corrupted file is retrained and replaced
    assert corpus_tokenizer(VOCAB, text=corpus[0], cache_dir=tmp_path).to_str() == first.to_str()


def test_default_cache_dir_honours_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / "seqppl" / "bpe"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir().parts[-3:] == (".cache", "seqppl", "bpe")


def test_eos_windows_end_paragraphs_with_eos(tokenizer):
    space = sp.SequenceSpace(vocab_size=VOCAB, length=6, eos=True)
    text = "a b\n\n" + "a much longer paragraph that needs more than one window"
    windows = token_windows(tokenizer, space, text)
    space.validate(windows)
    assert windows.shape[1] == 7 and (windows[:, -1] == space.eos_id).all()
    assert detokenize(tokenizer, windows[0]) == "a b"
    assert windows[0, len(tokenizer.encode("a b").ids)] == space.eos_id
    assert "".join(detokenize(tokenizer, windows[1:])) == text.split("\n\n")[1]
    fixed = token_windows(tokenizer, sp.SequenceSpace(vocab_size=VOCAB, length=6), text)
    assert fixed.shape[1] == 6 and text.startswith("".join(detokenize(tokenizer, fixed)))


def heldout_gain(arm, tokenizer, corpus):
    """Mean held-out log-likelihood per window over the uniform ARM's (nats)."""
    heldout = token_windows(tokenizer, arm.space, corpus[1], max_windows=200)
    uniform = sp.ARM.from_table(arm.lattice, np.zeros_like(arm.params))
    return float(np.mean(arm.log_prob(heldout) - uniform.log_prob(heldout)))


def test_fitted_base_is_a_markov_table_arm_that_beats_uniform(tokenizer, corpus):
    space = sp.SequenceSpace(vocab_size=VOCAB, length=8, eos=True)
    arm = ngram_base(tokenizer, space, text=corpus[0], key=jax.random.key(0), steps=20)
    assert arm.lattice.kind == "markov" and arm.lattice.num_states == VOCAB + 1
    assert arm.params.shape == (VOCAB + 1, VOCAB + 1) and np.isfinite(arm.params).all()
    assert heldout_gain(arm, tokenizer, corpus) > 4.0  # nats per window (7.7 seen)


def test_counts_base_beats_uniform_and_samples_detokenise(tokenizer, corpus):
    space = sp.SequenceSpace(vocab_size=VOCAB, length=8, eos=True)
    arm = ngram_base(tokenizer, space, text=corpus[0], method="counts")
    assert arm.lattice.kind == "markov" and np.isfinite(arm.params).all()
    assert heldout_gain(arm, tokenizer, corpus) > 8.0  # 13.8 seen
    samples = arm.sample(jax.random.key(1), (4,))
    space.validate(samples)
    texts = detokenize(tokenizer, samples)
    assert any(texts) and all(set(t) <= set(ALPHABET) for t in texts)


def test_bad_arguments_are_refused(tokenizer, corpus):
    with pytest.raises(ValueError, match="vocab_size must be an int >= 96"):
        train_tokenizer("abc", 50)
    wrong = sp.SequenceSpace(vocab_size=VOCAB - 1, length=4)
    with pytest.raises(ValueError, match="differs from the tokenizer's 128"):
        token_windows(tokenizer, wrong, "abc")
    space = sp.SequenceSpace(vocab_size=VOCAB, length=4)
    with pytest.raises(ValueError, match="needs key="):
        ngram_base(tokenizer, space, text=corpus[0])
    with pytest.raises(ValueError, match="cells"):
        ngram_base(tokenizer, space, order=4, text=corpus[0], method="counts")
    with pytest.raises(ValueError, match=r"tokens\[1\] = 200"):
        detokenize(tokenizer, [3, 200])


@pytest.mark.slow
def test_fit_approaches_the_counts_mle(tokenizer, corpus):
    space = sp.SequenceSpace(vocab_size=VOCAB, length=8, eos=True)
    fitted = ngram_base(tokenizer, space, text=corpus[0], key=jax.random.key(0), steps=300)
    counts = ngram_base(tokenizer, space, text=corpus[0], method="counts")
    gains = heldout_gain(fitted, tokenizer, corpus), heldout_gain(counts, tokenizer, corpus)
    assert abs(gains[0] - gains[1]) < 0.05 * gains[1], gains


@pytest.mark.slow
def test_full_corpus_at_32k_round_trips(tmp_path):
    train, heldout = stdlib_docstrings()
    tokenizer = corpus_tokenizer(32_000, text=train, cache_dir=tmp_path)
    assert 10_000 < tokenizer.get_vocab_size() <= 32_000  # stops when merges run out
    ids = corpus_token_ids(tokenizer, heldout)
    assert detokenize(tokenizer, ids) == tokenizer.normalizer.normalize_str(heldout)


@pytest.mark.slow
def test_base_times_regex_constraint_is_exact(tokenizer, corpus):
    space = sp.SequenceSpace(vocab_size=VOCAB, length=6, eos=True)
    arm = ngram_base(tokenizer, space, text=corpus[0], method="counts")
    pattern = r"[a-z]+( [a-z]+)*"
    ebm = arm.constrain(sp.Lattice.regex(space, pattern, tokenizer))
    exact = detokenize(tokenizer, sp.to_arm(ebm).sample(jax.random.key(0), (50,)))
    assert all(re.fullmatch(pattern, text) for text in exact)
    base = detokenize(tokenizer, arm.sample(jax.random.key(1), (4000,)))
    accepted = np.mean([re.fullmatch(pattern, text) is not None for text in base])
    stderr = np.sqrt(accepted * (1 - accepted) / len(base))
    assert abs(accepted - np.exp(float(ebm.log_partition()))) < 4 * stderr
