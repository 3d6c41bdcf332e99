"""Every ```python block in docs/*.md runs as written (blocks of a page share one namespace), and
every reference to the theory page names one of its sections."""

import re
import unicodedata
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = sorted(DOCS.glob("*.md"))


def test_there_are_docs():
    assert PAGES


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_code_blocks_run(page, capsys):
    blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.S)
    namespace = {}
    for block in blocks:
        exec(compile(block, str(page), "exec"), namespace)


# -- the theory page ---------------------------------------------------------------------------

ROOT = DOCS.parent
THEORY_PAGE = DOCS / "theory.md"
PUBLISHED = ("seqppl", "models", "examples", "docs", "benchmarks", "README.md")
INTERNAL_NOTE = "THEO" + "RY"  # built, so that this file does not mention it
ANCHOR_REFERENCE = re.compile(r"theory\.md#([\w-]+)")


def _published_files():
    """Every file of the published trees (the project's source, docs, examples, benchmarks)."""
    for name in PUBLISHED:
        path = ROOT / name
        found = [path] if path.is_file() else sorted(path.rglob("*"))
        yield from (f for f in found if f.is_file() and "__pycache__" not in f.parts)


def _slug(heading: str) -> str:
    """The anchor mkdocs gives a heading (Python-Markdown's ``toc.slugify``)."""
    text = unicodedata.normalize("NFKD", heading).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _theory_anchors() -> list[str]:
    text = re.sub(r"```.*?```", "", THEORY_PAGE.read_text(), flags=re.S)
    return [_slug(h) for h in re.findall(r"^#{1,6} +(.+?) *#*$", text, re.M)]


def test_nothing_published_cites_the_internal_note():
    """The project's own theory page is docs/theory.md; no file points anywhere else."""
    hits = [
        f"{path.relative_to(ROOT)}:{number}"
        for path in _published_files()
        for number, line in enumerate(path.read_bytes().splitlines(), 1)
        if INTERNAL_NOTE.encode() in line
    ]
    assert not hits, f"cite docs/theory.md instead of {INTERNAL_NOTE}: {hits}"


def test_theory_references_resolve_to_headings():
    anchors = _theory_anchors()
    repeated = sorted({a for a in anchors if anchors.count(a) > 1})
    assert not repeated, f"docs/theory.md repeats headings (ambiguous anchors): {repeated}"
    references = [
        (f"{path.relative_to(ROOT)}:{number}", anchor)
        for path in _published_files()
        if path.suffix in (".py", ".md", ".sh")
        for number, line in enumerate(path.read_text().splitlines(), 1)
        for anchor in ANCHOR_REFERENCE.findall(line)
    ]
    assert references, "nothing links a section of docs/theory.md"
    references += [
        ("docs/theory.md", anchor)
        for anchor in re.findall(r"\]\(#([\w-]+)\)", THEORY_PAGE.read_text())
    ]
    broken = [(where, anchor) for where, anchor in references if anchor not in anchors]
    assert not broken, f"no such heading in docs/theory.md: {broken}"
