"""The child runtime imports only the standard library, grpc, protobuf and the generated code."""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

import executor

if TYPE_CHECKING:
    from collections.abc import Iterator

PACKAGE = Path(executor.__file__).resolve().parent
REPO = PACKAGE.parent

# What the sandbox's own code may import besides the standard library.
ALLOWED_THIRD_PARTY = ("grpc", "google.protobuf")
# The parts of this package that the sandbox image carries (see the Makefile's image target).
ALLOWED_INTERNAL = ("executor.sandbox", "executor.v1")

# Modules that must never be loaded by the child runtime.
FORBIDDEN_TOP_LEVEL = ("docker", "requests", "urllib3", "cryptography", "rich")
FORBIDDEN_PARENT_MODULES = (
    "executor.runner",
    "executor.spec",
    "executor.events",
    "executor.rpc",
    "executor.rpc.auth",
    "executor.rpc.limits",
    "executor.rpc.server",
    "executor.rpc.servicer",
    "executor.rpc.session",
    "executor.backends",
    "executor.backends.docker",
    "executor.mailbox",
    "executor.mailbox.broker",
    "executor.mailbox.crypto",
    "executor.mailbox.transport",
    "executor.policy",
    "executor.policy.file",
    "executor.task.bundle",
    "executor.task.taskdir",
    "executor.task.supervisor",
    "executor.testing",
    "executor.testing.engine",
    "executor.testing.modeller",
    "executor.testing.transport",
    "executor.cli",
    "executor.cli.commands",
    "executor.cli.display",
    "executor.cli.doctor",
    "executor.cli.terminal",
    "executor.outcome",
    "executor.errors",
)


# -- static check -------------------------------------------------------------


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _allowed(name: str) -> bool:
    """Whether the sandbox's code may import module ``name``."""
    top = name.split(".")[0]
    if top == "executor":
        return name == "executor" or any(_within(name, p) for p in ALLOWED_INTERNAL)
    if top in sys.stdlib_module_names:
        return True
    return any(_within(name, p) for p in ALLOWED_THIRD_PARTY)


def _module_file(name: str) -> Path | None:
    """The source file of an ``executor`` module, if it is one."""
    parts = name.split(".")
    if parts[0] != "executor":
        return None
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[str, int]]:
    """Absolute names of the modules ``tree`` imports when it runs, with line numbers.

    Imports inside functions count (they run when called); imports under
    ``if TYPE_CHECKING:`` do not. ``from X import Y`` yields ``X.Y`` when that
    is a module of this package, since that imports it.
    """
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module if is_package else module.rpartition(".")[0]
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                base = f"{package}.{node.module}" if node.module else package
            else:
                base = node.module or ""
            yield base, node.lineno
            for alias in node.names:
                if _module_file(f"{base}.{alias.name}") is not None:
                    yield f"{base}.{alias.name}", node.lineno
        stack.extend(ast.iter_child_nodes(node))


def _violations(source: str, module: str, is_package: bool = False) -> list[str]:
    tree = ast.parse(source)
    return [
        f"{module}:{line}: imports {name}"
        for name, line in _runtime_imports(tree, module, is_package)
        if not _allowed(name)
    ]


def _sandbox_closure() -> tuple[set[Path], list[str]]:
    """Every file the child runtime loads from this package, and every bad import in them."""
    queue = sorted((PACKAGE / "sandbox").rglob("*.py"))
    seen: set[Path] = set()
    problems: list[str] = []
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        name = _module_name(path)
        is_package = path.name == "__init__.py"
        # Importing a module first imports every package above it.
        parents = name.split(".")
        for i in range(1, len(parents)):
            parent = _module_file(".".join(parents[:i]))
            if parent is not None:
                queue.append(parent)
        tree = ast.parse(path.read_text(), filename=str(path))
        for imported, line in _runtime_imports(tree, name, is_package):
            if not _allowed(imported):
                problems.append(f"{path.relative_to(REPO)}:{line}: imports {imported}")
                continue
            target = _module_file(imported)
            if target is not None:
                queue.append(target)
    return seen, problems


def test_sandbox_sources_import_only_stdlib_grpc_protobuf_and_sandbox_code():
    files, problems = _sandbox_closure()
    assert not problems, "the child runtime imports what the sandbox image lacks:\n" + "\n".join(problems)
    loaded = {str(p.relative_to(REPO)) for p in files}
    # The closure really followed the runtime's imports into the generated code.
    assert {
        "executor/__init__.py",
        "executor/sandbox/runtime.py",
        "executor/sandbox/context.py",
        "executor/v1/sandbox_pb2.py",
        "executor/v1/sandbox_pb2_grpc.py",
    } <= loaded


def test_static_checker_catches_forbidden_imports():
    source = """
from __future__ import annotations
import json
from typing import TYPE_CHECKING
import grpc
from google.protobuf import message
from executor.v1 import sandbox_pb2
from . import context
if TYPE_CHECKING:
    import docker
import requests
from executor import policy
from executor.runner import Executor
from .. import rpc
import google.auth
def lazy():
    import cryptography
"""
    found = _violations(source, "executor.sandbox.fake")
    assert sorted(v.split(": imports ")[1] for v in found) == [
        "cryptography",
        "executor.policy",
        "executor.rpc",
        "executor.runner",
        "google.auth",
        "requests",
    ]


# -- dynamic check ------------------------------------------------------------

_PROBE = (
    "import json, sys; before = set(sys.modules); "
    "import executor.sandbox.runtime, executor.sandbox.context; "
    "print(json.dumps({'all': sorted(sys.modules), 'new': sorted(set(sys.modules) - before)}))"
)


def _run_probe(code: str, *, cwd: Path = REPO, prefix: list[str] | None = None) -> dict[str, list[str]]:
    proc = subprocess.run(
        [sys.executable, *(prefix or []), "-c", code],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result: dict[str, list[str]] = json.loads(proc.stdout)
    return result


def _third_party_allowed_at_runtime(name: str) -> bool:
    top = name.split(".")[0]
    if top in sys.stdlib_module_names or name == "executor":
        return True
    if any(_within(name, p) for p in ALLOWED_INTERNAL):
        return True
    if any(_within(name, p) for p in (*ALLOWED_THIRD_PARTY, "google", "typing_extensions")):
        return True
    # Loaded by grpc itself: its Cython core's runtime modules, and grpcio-tools'
    # compatibility shim when that (dev-only) package happens to be installed.
    return top.startswith("_cython_") or top in ("cython_runtime", "grpc_tools")


@pytest.mark.timeout(60)
def test_importing_the_runtime_loads_no_parent_side_modules():
    modules = _run_probe(_PROBE)
    loaded = set(modules["all"])
    forbidden = sorted(
        m for m in loaded if m.split(".")[0] in FORBIDDEN_TOP_LEVEL or m in FORBIDDEN_PARENT_MODULES
    )
    assert not forbidden, f"the child runtime loaded parent-side modules: {forbidden}"
    foreign = sorted(m for m in modules["new"] if not _third_party_allowed_at_runtime(m))
    assert not foreign, f"the child runtime loaded modules outside its allowed set: {foreign}"
    assert {"executor.sandbox.runtime", "grpc", "google.protobuf"} <= loaded


def _image_lib(tmp_path: Path) -> Path:
    """A copy of exactly what the sandbox image carries of this package (see the Makefile)."""
    lib = tmp_path / "lib"
    (lib / "executor").mkdir(parents=True)
    shutil.copy(PACKAGE / "__init__.py", lib / "executor" / "__init__.py")
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(PACKAGE / "sandbox", lib / "executor" / "sandbox", ignore=ignore)
    shutil.copytree(PACKAGE / "v1", lib / "executor" / "v1", ignore=ignore)
    return lib


def _image_path_setup(lib: Path) -> str:
    # -S skips site, so neither the repository nor its editable-install finder is
    # reachable: only the copied files and the installed grpc and protobuf are.
    site_packages = Path(grpc.__file__).resolve().parent.parent
    return f"import sys; sys.path[:0] = [{str(lib)!r}, {str(site_packages)!r}]; "


@pytest.mark.timeout(60)
def test_runtime_imports_from_exactly_what_the_image_carries(tmp_path):
    lib = _image_lib(tmp_path)
    setup = _image_path_setup(lib)
    modules = _run_probe(setup + _PROBE, cwd=tmp_path, prefix=["-S"])
    assert "executor.sandbox.runtime" in modules["new"]
    # The probe itself can fail: a parent-side module is out of reach in this setting.
    proc = subprocess.run(
        [sys.executable, "-S", "-c", setup + "import executor.policy"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "No module named 'executor.policy'" in proc.stderr


@pytest.mark.timeout(60)
def test_runtime_entry_point_runs_from_what_the_image_carries(tmp_path):
    lib = _image_lib(tmp_path)
    code = _image_path_setup(lib) + (
        "import runpy; sys.argv = ['executor.sandbox', '--help']; "
        "runpy.run_module('executor.sandbox', run_name='__main__')"
    )
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "--token-file" in proc.stdout


@pytest.mark.timeout(60)
def test_importing_the_package_alone_is_lazy():
    modules = _run_probe(
        "import json, sys; before = set(sys.modules); import executor; "
        "print(json.dumps({'all': sorted(sys.modules), 'new': sorted(set(sys.modules) - before)}))"
    )
    heavy = sorted(
        m
        for m in modules["all"]
        if m.split(".")[0] in ("docker", "grpc", "google", "cryptography", "rich", "requests")
    )
    assert not heavy, f"`import executor` loaded {heavy}"
    assert [m for m in modules["all"] if m.startswith("executor")] == ["executor"]


def test_lazy_public_names_still_resolve():
    assert executor.IsolationPolicy.__module__ == "executor.policy"
    assert executor.Status.OK == "OK"
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = executor.Nope
