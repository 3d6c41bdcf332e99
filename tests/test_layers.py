"""The layout DESIGN draws, read from the source: no import cycle, no private name used across
modules, small modules, and a library core that does not import the model zoo."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "seqppl"
TREES = ["seqppl", "models", "tests", "examples", "benchmarks"]
MAX_LINES = 400
PUBLIC_UNDERSCORED = {"os._exit"}
"""Documented public functions whose names start with an underscore (exit without clean-up)."""


def _module_name(path: Path) -> str:
    """The dotted name a file is imported as (``models/`` is installed as ``seqppl.models``)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "models":
        parts = ["seqppl", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _python_files(*trees: str) -> list[Path]:
    return sorted(p for tree in trees for p in (ROOT / tree).rglob("*.py"))


def _imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Every import of the file, module level or inside functions: (module, names, line)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path).rsplit(".", 0 if path.name == "__init__.py" else 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend((alias.name, [], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, module] if module else base)
            out.append((module, [alias.name for alias in node.names], node.lineno))
    return out


def _library_graph() -> dict[str, set[str]]:
    """``module -> the seqppl modules it imports`` (a name imported from a package counts as
    that submodule when one exists)."""
    files = {_module_name(p): p for p in _python_files("seqppl", "models")}
    graph = {name: set() for name in files}
    for name, path in files.items():
        for module, names, _ in _imports(path):
            if not module.startswith("seqppl"):
                continue
            targets = {f"{module}.{n}" for n in names if f"{module}.{n}" in files}
            graph[name] |= targets or {module} & files.keys()
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, or None (depth-first search with colours)."""
    colour = dict.fromkeys(graph, 0)
    stack: list[str] = []

    def visit(node):
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if colour.get(nxt) == 0 and (found := visit(nxt)):
                return found
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if colour[node] == 0 and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_library():
    graph = _library_graph()
    assert "seqppl.distributions.ebm" in graph and graph["seqppl.distributions.arm"]
    # the package __init__ files re-export; the cycle test is about the modules themselves
    modules = {n: {m for m in deps if not _is_package(m)} for n, deps in graph.items()}
    modules = {n: d for n, d in modules.items() if not _is_package(n)}
    assert _cycle(modules) is None, f"import cycle: {' -> '.join(_cycle(modules))}"


def _is_package(name: str) -> bool:
    return name in ("seqppl", "seqppl.distributions", "seqppl.models")


def test_no_private_name_is_used_across_modules():
    """``from m import _x`` and ``m._x`` (``m`` an imported module) are refused everywhere."""
    offences = []
    for path in _python_files(*TREES):
        tree = ast.parse(path.read_text())
        modules = set()
        for module, names, line in _imports(path):
            if module == "__future__":
                continue
            private = [n for n in names if n.startswith("_")]
            offences += [f"{path.relative_to(ROOT)}:{line} imports {module}.{n}" for n in private]
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("seqppl"):
                modules |= {a.asname or a.name for a in node.names}
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in modules
                and f"{node.value.id}.{node.attr}" not in PUBLIC_UNDERSCORED
            ):
                offences.append(
                    f"{path.relative_to(ROOT)}:{node.lineno} uses {node.value.id}.{node.attr}"
                )
    assert not offences, "\n".join(offences)


@pytest.mark.parametrize("path", _python_files("seqppl", "models"), ids=lambda p: p.name)
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_LINES})"


def test_the_library_core_does_not_import_the_model_zoo():
    """Only the command line (the top layer) may use ``seqppl.models``."""
    for path in _python_files("seqppl"):
        if path.name == "cli.py":
            continue
        for module, _, line in _imports(path):
            assert not module.startswith("seqppl.models"), f"{path.name}:{line} imports {module}"


def test_layers_import_downwards_only():
    """DESIGN's layers: each module imports only from its own layer and those below."""
    layer = {
        **dict.fromkeys(["space", "logspace", "checks", "sharding", "diagnostics", "progress"], 1),
        **dict.fromkeys(["constraints", "processes"], 1),
        **dict.fromkeys(["tables", "lattice", "products", "options"], 2),
        **dict.fromkeys(["backward", "bellman"], 3),
        "distributions": 4,
        **dict.fromkeys(["estimate", "importance", "smc", "partition", "train", "loop"], 5),
        **dict.fromkeys(["masking", "table_twist", "twists"], 5),
        **dict.fromkeys(["objectives", "distill", "report", "distillation_report"], 6),
        "masking_report": 6,
        **dict.fromkeys(["posterior_comparison", "student_posterior"], 6),
        **dict.fromkeys(["cli", "cli_options", "__main__", "environment", "distributed"], 7),
    }

    def layer_of(module: str) -> int:
        parts = module.split(".")
        return layer[parts[1]] if len(parts) > 1 else 8  # the package itself: the top

    for name, deps in _library_graph().items():
        if not name.startswith("seqppl.") or name.startswith("seqppl.models"):
            continue
        for dep in deps:
            if dep.startswith("seqppl.models") or _is_package(dep):
                continue
            assert layer_of(dep) <= layer_of(name), f"{name} (layer {layer_of(name)}) imports {dep}"
