"""The layering of DESIGN.md, read from the code: ``core <- {pipelines, mm} <- jobs``, no circles.

Every import of the project's own modules is collected from the syntax tree, function-level ones
included (a lazy import still ties two modules together). ``core`` imports nothing of the
project; ``pipelines`` and ``mm`` import only ``core`` and themselves (they meet through Parquet
files, the schema and the tokenizer); nothing imports ``jobs`` but ``jobs``; and no two modules
reach each other through a chain of imports.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "pipelines", "mm", "jobs")
ALLOWED = {"core": {"core"}, "pipelines": {"core", "pipelines"}, "mm": {"core", "mm"},
           "jobs": {"core", "pipelines", "mm", "jobs"}}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports (module level and inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # ``from a import b``: the module a.b when b is one, else a
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for t in targets:
            while t and t not in modules:  # ``import a.b.c`` of a name inside a module
                t = t.rpartition(".")[0]
            if t and t.split(".")[0] in PACKAGES and t != name:
                out.add(t)
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    files = {module_name(p, root): p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")}
    modules = set(files)
    return {name: project_imports(path, name, modules) for name, path in files.items()}


def layer_breaches(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} imports {b}" for a, deps in graph.items() for b in deps
                  if b.split(".")[0] not in ALLOWED[a.split(".")[0]])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, it = work[-1]
            for nxt in it:
                if nxt not in graph:
                    continue
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        x = stack.pop()
                        on_stack.discard(x)
                        comp.append(x)
                        if x == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_layers_hold_and_there_is_no_import_circle():
    graph = import_graph(ROOT)
    assert {"core.config", "pipelines.curate", "mm.train", "jobs.cli"} <= set(graph)
    assert layer_breaches(graph) == []
    assert cycles(graph) == []


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.mark.parametrize("files, breach", [
    ({"core/a.py": "def f():\n    from jobs import cli\n", "jobs/cli.py": ""}, "core.a imports jobs.cli"),
    ({"mm/a.py": "from pipelines.b import x\n", "pipelines/b.py": "x = 1\n"}, "mm.a imports pipelines.b"),
    ({"pipelines/a.py": "import mm.models\n", "mm/models/__init__.py": ""}, "pipelines.a imports mm.models"),
])
def test_the_check_catches_a_breach_even_inside_a_function(tmp_path, files, breach):
    _write(tmp_path, files)
    assert breach in layer_breaches(import_graph(tmp_path))


def test_the_check_catches_a_circle_through_a_lazy_import(tmp_path):
    _write(tmp_path, {"mm/__init__.py": "", "mm/a.py": "from mm.b import g\n",
                      "mm/b.py": "def g():\n    from mm import a\n", "mm/c.py": "from . import a\n"})
    assert cycles(import_graph(tmp_path)) == [["mm.a", "mm.b"]]
