"""A character-level corpus built at run time from the running Python's standard library.

The docstrings of every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (read with
``ast``, never imported: some modules have side effects), in sorted path order; a file goes to the
held-out split when ``crc32(relative path) % 10 == 0``, so the split is deterministic. Characters
are printable ASCII and newline (96 ids); any other character becomes ``?``.
"""

from __future__ import annotations

import ast
import sysconfig
import warnings
import zlib
from pathlib import Path

import numpy as np

__all__ = ["ALPHABET", "stdlib_docstrings", "encode", "decode", "windows"]

ALPHABET = "\n" + "".join(chr(c) for c in range(32, 127))
_INDEX = {c: i for i, c in enumerate(ALPHABET)}


def stdlib_docstrings(max_files: int | None = None) -> tuple[str, str]:
    """``(train_text, heldout_text)``: the stdlib's docstrings, split by file (see module doc)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if max_files is not None:
        files = files[:max_files]
    train, heldout = [], []
    for path in files:
        try:
            with warnings.catch_warnings():  # invalid escapes in old sources: not ours to report
                warnings.simplefilter("ignore")
                tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue  # test fixtures with deliberate errors, unreadable files
        docs = [
            ast.get_docstring(node)
            for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        ]
        text = "\n\n".join(d for d in docs if d)
        if text:
            relative = path.relative_to(root).as_posix()
            (heldout if zlib.crc32(relative.encode()) % 10 == 0 else train).append(text)
    return "\n\n".join(train), "\n\n".join(heldout)


def encode(text: str) -> np.ndarray:
    """Character ids ``[len(text)]`` (int32); characters outside the alphabet become ``?``."""
    unknown = _INDEX["?"]
    return np.fromiter((_INDEX.get(c, unknown) for c in text), np.int32, len(text))


def decode(ids) -> str:
    """The inverse of ``encode`` (on alphabet characters)."""
    return "".join(ALPHABET[int(i)] for i in np.asarray(ids).ravel())


def windows(ids: np.ndarray, length: int, max_windows: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``[N, length]`` of ``ids`` (the tail that does not fill one is
    dropped); the first ``max_windows`` if given."""
    count = len(ids) // length
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * length].reshape(count, length)
