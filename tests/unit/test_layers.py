"""The parent side's layer rules: which room may import which, and no import cycle.

Each room of ``executor/`` sits on a layer; a module may import its own room and
the rooms of lower layers, never a higher one. Every import counts: module-level,
inside a function, and under ``TYPE_CHECKING`` (a type from a higher layer is a
dependency on it all the same). The child runtime's own, stricter rule (standard
library, grpc, protobuf and the generated code only) is in ``test_import_boundary``.
"""

from __future__ import annotations

import ast
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import executor

if TYPE_CHECKING:
    from collections.abc import Iterator

PACKAGE = Path(executor.__file__).resolve().parent

# Lowest first. A room is a subpackage or a top-level module of executor/.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("v1", "sandbox"),  # the wire: generated code, the contract, the child runtime
    ("errors", "paths"),
    ("policy",),
    ("mailbox",),
    ("spec",),
    ("backends",),
    ("data",),
    ("outcome", "events", "hooks"),
    ("rpc",),
    ("task",),
    ("runner",),
    ("cli", "testing", "__init__"),
)
LAYER_OF = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}

# Edges the reshape has not removed yet: (importing module, imported module).
# The list only shrinks; test_known_exceptions_still_exist keeps it honest.
KNOWN_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(name: str) -> str:
    """The module a dotted name imported from ``executor`` refers to (a module, or its package)."""
    parts = name.split(".")
    while parts:
        candidate = PACKAGE.parent.joinpath(*parts)
        if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
            return ".".join(parts)
        parts = parts[:-1]
    return name


def _imports(path: Path) -> Iterator[tuple[str, int]]:
    """Every module of this package that ``path`` imports, with the line it does so."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = _module_name(path)
    is_package = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "executor" or alias.name.startswith("executor."):
                    yield _resolve(alias.name), node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".") if is_package else here.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            if module != "executor" and not module.startswith("executor."):
                continue
            for alias in node.names:
                if alias.name == "*":
                    yield _resolve(module), node.lineno
                else:
                    yield _resolve(f"{module}.{alias.name}"), node.lineno


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _edges() -> dict[str, dict[str, int]]:
    edges: dict[str, dict[str, int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        src = _module_name(path)
        for dst, line in _imports(path):
            if dst != src:
                edges.setdefault(src, {}).setdefault(dst, line)
    return edges


def _violations() -> list[tuple[str, str, int]]:
    found = []
    for src, targets in _edges().items():
        for dst, line in targets.items():
            if dst == "executor" and src != "executor":
                # ``from executor import __version__`` resolves to the package itself.
                continue
            if LAYER_OF[_room(dst)] > LAYER_OF[_room(src)]:
                found.append((src, dst, line))
    return found


def test_every_room_has_a_layer() -> None:
    rooms = {_room(_module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert rooms <= set(LAYER_OF), f"rooms with no layer: {sorted(rooms - set(LAYER_OF))}"


def test_no_module_imports_a_higher_layer() -> None:
    bad = [
        f"{src} (line {line}) imports {dst}: {_room(src)} may not import {_room(dst)}"
        for src, dst, line in _violations()
        if (src, dst) not in KNOWN_EXCEPTIONS
    ]
    assert not bad, "\n".join(bad)


def test_known_exceptions_still_exist() -> None:
    present = {(src, dst) for src, dst, _ in _violations()}
    gone = sorted(KNOWN_EXCEPTIONS - present)
    assert not gone, f"remove these from KNOWN_EXCEPTIONS, they are fixed: {gone}"


def test_no_import_cycle_between_modules() -> None:
    edges = {src: set(dsts) - {"executor"} for src, dsts in _edges().items()}
    # A package imports its own modules to re-export them; that is not a cycle of design.
    for src in edges:
        edges[src] = {
            d for d in edges[src] if not d.startswith(src + ".") and (src, d) not in KNOWN_EXCEPTIONS
        }
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join([*c, c[0]]) for c in cycles)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize(
    ("source", "line"),
    [
        ("executor/data/scratch.py", "from executor.task import run\n"),
        ("executor/policy/scratch.py", "def f():\n    from executor.runner import Executor\n"),
        (
            "executor/rpc/scratch.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import executor.cli\n",
        ),
    ],
)
def test_a_forbidden_import_added_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, line: str
) -> None:
    # The rules run over a scratch copy of the package with one bad module added.
    copy = tmp_path / "executor"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / source).write_text(f'"""Scratch."""\n{line}')
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", copy)
    scratch = source.removesuffix(".py").replace("/", ".")
    assert any(src == scratch for src, _, _ in _violations())
