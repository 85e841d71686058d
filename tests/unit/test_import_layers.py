"""The package's import graph: no cycles, and no import inside a function
that is not a deliberate lazy import listed here with its reason.

The graph is read from the source with ast (imports at the top of a module
and inside functions alike), so a cycle hidden behind a function-level
import is still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import tidegate

PACKAGE = Path(tidegate.__file__).resolve().parent
GENERATED = {"v1"}  # protobuf code, generated from proto/

# importing module -> (the tidegate modules it may import inside a function, why)
LAZY = {
    "tidegate.cli.delegated": ({"tidegate.daemon.main", "tidegate.daemon.early", "tidegate.fleet.cli"},
                               "CLI start-up: `agent` and `fleet` load the daemon (a compile child started ahead first, "
                               "when likely) or the etcd client when they run"),
    "tidegate.cli.entry": ({"tidegate.daemon.early", "tidegate.cli.main"},
                           "the `tidegate` command: `agent` starts its compile or cached load before any import, "
                           "the command line's own included"),
    "tidegate.cli.offline": ({"tidegate.access.certs", "tidegate.kernel.filter", "tidegate.lab.replay",
                              "tidegate.lab.run"},
                             "CLI start-up: offline verbs load bcc, pyroute2 or the PKI tools when they run"),
    "tidegate.lab.traffic": ({"tidegate.lab.replay"}, "the sender process loads bcc (via replay) only to send a pcap"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")
            if not GENERATED & set(p.relative_to(PACKAGE).parts)}  # fmt: skip


def imports(path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported tidegate module, line, inside a function) for each import of one."""
    out = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                if isinstance(child, ast.Import):
                    names = [a.name for a in child.names]
                else:
                    base = child.module or ""
                    # `from tidegate.x import y`: y is a module when it is one, else a name in tidegate.x
                    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
                for name in dict.fromkeys(names):
                    if name in known:
                        out.append((name, child.lineno, in_function))
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return out


def graph() -> tuple[dict[str, set[str]], list[tuple[str, str, int]]]:
    """Edges between modules (every import), and the function-level imports."""
    mods = modules()
    known = set(mods)
    edges: dict[str, set[str]] = {m: set() for m in mods}
    lazy = []
    for m, path in mods.items():
        for target, line, in_function in imports(path, known):
            if target != m:
                edges[m].add(target)
            if in_function:
                lazy.append((m, target, line))
    return edges, lazy


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles():
    edges, _ = graph()
    assert len(edges) > 40, "the package's modules were found"
    assert cycles(edges) == []


def test_function_level_imports_are_the_listed_lazy_ones():
    _, lazy = graph()
    unlisted = [f"{m}:{line} imports {t}" for m, t, line in lazy if t not in LAZY.get(m, (set(), ""))[0]]
    assert unlisted == []


def test_the_checks_see_a_cycle_and_a_function_level_import(tmp_path):
    # the checker itself: a cycle is found, and an import inside a function is told apart
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    src = tmp_path / "m.py"
    src.write_text("from tidegate.x import y, name\nimport tidegate.z\n\ndef f():\n    from tidegate.z import w\n")
    assert imports(src, {"tidegate.x", "tidegate.x.y", "tidegate.z"}) == [
        ("tidegate.x.y", 1, False), ("tidegate.x", 1, False), ("tidegate.z", 2, False), ("tidegate.z", 5, True)]


def test_every_lazy_import_listed_still_exists():
    _, lazy = graph()
    importers = {m for m, _, _ in lazy}
    assert sorted(set(LAZY) - importers) == [], "an entry no module needs any more: remove it"
