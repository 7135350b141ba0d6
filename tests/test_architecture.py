"""The layers hold: no import circles among knowmri's modules (imports inside functions count), the
report's data types import nothing above them, and the cross-method analysis names no method.

Imports are read with `ast` from the sources (nothing is imported); a package's `__init__` stands for
the package, and `from pkg import name` counts as importing `pkg.name` when that is a module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import knowmri
from knowmri.methods.base import list_methods

ROOT = Path(knowmri.__file__).parent

# Import circles allowed, each as the edge that closes it (none: keep it that way).
KNOWN_CIRCLES: set[tuple[str, str]] = set()

# What the report's data layer (report.json, its HTML page, MethodResult) may not import.
ABOVE_REPORT = ("knowmri.methods", "knowmri.analysis", "knowmri.models", "knowmri.hooks")


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = ["knowmri", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> dict[str, int]:
    """The knowmri modules `name` imports anywhere in its source, with the line of the first import."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def owner(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    out: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str | None] = []
        if isinstance(node, ast.Import):
            targets = [owner(a.name) for a in node.names if a.name.split(".")[0] == "knowmri"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] == "knowmri":
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else owner(base) for a in node.names]
        for target in targets:
            if target and target != name:
                out.setdefault(target, node.lineno)
    return out


def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles() -> None:
    edges = {a: {b for b in targets if (a, b) not in KNOWN_CIRCLES} for a, targets in graph().items()}
    found = circles(edges)
    detail = ["; ".join(f"{a} -> {b}" for a in c for b in sorted(edges[a]) if b in c) for c in found]
    assert not found, "import circles: " + " | ".join(detail)


def test_circle_finder_sees_circles_through_function_imports(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text("def f():\n    from knowmri.b import g\n")
    (tmp_path / "b.py").write_text("import knowmri.a\n")
    known = {"knowmri.a": tmp_path / "a.py", "knowmri.b": tmp_path / "b.py"}
    edges = {name: set(imports(name, path, known)) for name, path in known.items()}
    assert circles(edges) == [["knowmri.a", "knowmri.b"]]


def test_report_imports_nothing_above_it() -> None:
    bad = [f"{name} imports {target} (line {line})" for name, targets in graph().items()
           if name == "knowmri.report" or name.startswith("knowmri.report.")
           for target, line in targets.items() if target.startswith(ABOVE_REPORT)]
    assert not bad, "; ".join(bad)


def test_analysis_names_no_method() -> None:
    """The cross-method analysis reads findings; a method's name in its code would single one method out."""
    names = {cls.name for cls in list_methods()}
    found = []
    for path in sorted((ROOT / "analysis").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{path.name}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Name) and node.id in names:
                found.append(f"{path.name}:{node.lineno} {node.id}")
    assert not found, ", ".join(found)
