"""The layout rules docs/architecture.md states, checked on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

import moeprof

PACKAGE = Path(moeprof.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path, name: str, known: set[str]) -> set[str]:
    """moeprof modules that `path` imports anywhere (top level or inside functions: a lazy
    import still ties the two modules together)."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in known:
                    found.add(sub)  # `from pkg import submodule`
                elif target in known:
                    found.add(target)
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, name, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the stack, 2 done
    for root in sorted(graph):
        if colour[root]:
            continue
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        path = [root]
        colour[root] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if colour[nxt] == 1:
                return path[path.index(nxt) :] + [nxt]
            if colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_lazy_and_relative_imports(tmp_path: Path) -> None:
    known = {"moeprof.x", "moeprof.y", "moeprof.z"}
    src = tmp_path / "x.py"
    src.write_text("def f():\n    from moeprof import y\n    from .z import thing\n")
    assert _imports(src, "moeprof.x", known) == {"moeprof.y", "moeprof.z"}


def test_no_import_cycle_inside_moeprof() -> None:
    graph = import_graph()
    assert "moeprof.analyze" in graph and graph["moeprof"], "the walk found no modules"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _names_pynvml(node: ast.AST) -> bool:
    """An import of pynvml, or importlib.import_module("pynvml")."""
    if isinstance(node, ast.Import):
        return any(a.name == "pynvml" for a in node.names)
    if isinstance(node, ast.ImportFrom):
        return node.module == "pynvml"
    if isinstance(node, ast.Call):
        return any(isinstance(a, ast.Constant) and a.value == "pynvml" for a in node.args)
    return False


def test_only_the_nvml_binding_imports_pynvml() -> None:
    importers = sorted(
        name
        for name, path in _modules().items()
        if any(_names_pynvml(n) for n in ast.walk(ast.parse(path.read_text())))
    )
    assert importers == ["moeprof.nvml.binding"]


def test_no_comment_or_doc_points_outside_the_repository() -> None:
    repo = PACKAGE.parent
    texts = list(PACKAGE.rglob("*.py")) + list((repo / "docs").glob("*.md")) + [repo / "README.md"]
    offenders = [
        str(p.relative_to(repo))
        for p in texts
        if "DESIGN.md" in p.read_text() or "../shared" in p.read_text()
    ]
    assert offenders == []
