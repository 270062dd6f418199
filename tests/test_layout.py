"""The layout holds the architecture (docs/architecture.md): the room layer knows nothing of sales,
the app's container or the HTTP edge; plumbing knows no domain; no import cycles; modules stay
small. Read from the source's imports (module level, TYPE_CHECKING and function bodies left out:
those are deferred on purpose)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

from tests.support import REPO

SERVER = REPO / "server"
MAX_LINES = 300
# Modules allowed past MAX_LINES, and why.
LONG: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> Iterator[Path]:
    yield from sorted(SERVER.rglob("*.py"))


def imports(path: Path) -> set[str]:
    """The server.* modules `path` imports when it is loaded."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:  # module level only
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for sub in ast.walk(node) if isinstance(node, (ast.Import, ast.ImportFrom, ast.Try, ast.If)) else ():
            if isinstance(sub, ast.Import):
                found |= {a.name for a in sub.names}
            elif isinstance(sub, ast.ImportFrom) and sub.module:
                found.add(sub.module)
                found |= {f"{sub.module}.{a.name}" for a in sub.names}
    known = {module_name(p) for p in modules()}
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) - {module_name(p)} for p in modules()}


def test_the_room_layer_imports_no_inventory_no_container_and_no_http_edge() -> None:
    for path in (SERVER / "rooms").rglob("*.py"):
        wrong = {m for m in imports(path) if m.startswith(("server.inventory", "server.api", "server.wiring",
                                                           "server.app", "server.jobs", "server.cli"))}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def test_the_inventory_imports_neither_the_container_nor_the_http_edge() -> None:
    for path in (SERVER / "inventory").rglob("*.py"):
        wrong = {m for m in imports(path) if m.startswith(("server.api", "server.wiring", "server.app", "server.jobs"))}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def test_plumbing_knows_no_domain() -> None:
    for path in (SERVER / "backends").rglob("*.py"):
        wrong = {m for m in imports(path) if not m.startswith("server.backends") and m != "server.errors"}
        assert not wrong, f"{path.relative_to(REPO)} imports {sorted(wrong)}"


def test_no_import_cycles() -> None:
    edges = graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if name in done:
            return
        for target in sorted(edges.get(name, ())):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(edges):
        visit(name, [])


def test_modules_stay_small() -> None:
    long = {str(p.relative_to(REPO)): n for p in [*modules(), *(REPO / "load").rglob("*.py")]
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert set(long) <= set(LONG), f"over {MAX_LINES} lines: {long}"
