"""Turn a protocol directory into the read-only bundle a sandbox imports.

The parent never imports or runs protocol code (design invariant 2). It only
copies the files, refusing anything that could reach outside the bundle
(symlinks, devices, sockets), and parses ``protocol.py`` with :mod:`ast` (which
executes nothing) so that a missing ``run`` is reported before a container
starts.
"""

from __future__ import annotations

import ast
import hashlib
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from executor.errors import ProtocolBundleError

ENTRY_FILE = "protocol.py"
ENTRY_MODULE = "protocol"
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_BUNDLE_FILES = 10_000
MAX_ENTRY_BYTES = 4 * 1024 * 1024
_SKIP_DIRS = {"__pycache__", ".git", ".mypy_cache", ".pytest_cache", ".ruff_cache"}


@dataclass(frozen=True)
class Bundle:
    """A validated copy of a protocol directory.

    Attributes:
        path: Where the copy lives (inside the task directory).
        sha256: A digest over the relative paths and contents of every file.
        size: Total size in bytes.
        files: Number of files.
    """

    path: Path
    sha256: str
    size: int
    files: int


def check_protocol_dir(source: Path) -> None:
    """Fail with a one-line error unless ``source`` holds a usable protocol.

    Raises:
        ProtocolBundleError: The directory or its ``protocol.py`` is missing, is a
            symlink, does not parse, or defines no top-level ``run``.
    """
    if not source.is_dir():
        raise ProtocolBundleError(f"protocol directory {source} does not exist or is not a directory")
    entry = source / ENTRY_FILE
    try:
        st = entry.lstat()
    except FileNotFoundError:
        raise ProtocolBundleError(f"protocol directory {source} has no {ENTRY_FILE}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ProtocolBundleError(f"{entry} must be a regular file, not a link or special file")
    if st.st_size > MAX_ENTRY_BYTES:
        raise ProtocolBundleError(f"{entry} is {st.st_size} bytes; the limit is {MAX_ENTRY_BYTES}")
    try:
        tree = ast.parse(entry.read_bytes(), filename=str(entry))
    except SyntaxError as exc:
        raise ProtocolBundleError(f"{entry} does not parse: {exc.msg} (line {exc.lineno})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ProtocolBundleError(f"{entry} does not parse: {type(exc).__name__}") from None
    if not _defines_run(tree):
        raise ProtocolBundleError(f"{entry} defines no top-level run(ctx)")


def _defines_run(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "run":
            return True
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "run" for t in node.targets
        ):
            return True
        if (
            isinstance(node, ast.AnnAssign)
            and node.value is not None
            and isinstance(node.target, ast.Name)
            and node.target.id == "run"
        ):
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
            (alias.asname or alias.name) == "run" for alias in node.names
        ):
            return True
    return False


def copy_bundle(source: Path, dest: Path) -> Bundle:
    """Copy the protocol in ``source`` to ``dest`` (which must not exist).

    Files become world-readable and read-only so that the sandbox's
    unprivileged user can import them; directories become traversable.

    Raises:
        ProtocolBundleError: The protocol is unusable, holds a symlink or special
            file, or exceeds the size or file-count limits.
    """
    check_protocol_dir(source)
    digest = hashlib.sha256()
    total = 0
    count = 0
    dest.mkdir(mode=0o755)
    for root, dirs, files in os.walk(source, followlinks=False):
        rel_root = Path(root).relative_to(source)
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in dirs:
            if (Path(root) / name).is_symlink():
                raise ProtocolBundleError(f"protocol bundle may not contain symlinks: {rel_root / name}")
            (dest / rel_root / name).mkdir(mode=0o755)
        for name in sorted(files):
            src = Path(root) / name
            rel = rel_root / name
            st = src.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolBundleError(f"protocol bundle may contain only regular files, not {rel}")
            count += 1
            total += st.st_size
            if count > MAX_BUNDLE_FILES:
                raise ProtocolBundleError(f"protocol bundle has more than {MAX_BUNDLE_FILES} files")
            if total > MAX_BUNDLE_BYTES:
                raise ProtocolBundleError(f"protocol bundle exceeds {MAX_BUNDLE_BYTES} bytes")
            target = dest / rel
            with open(src, "rb") as fin, open(target, "xb") as fout:
                shutil.copyfileobj(fin, fout)
            digest.update(rel.as_posix().encode() + b"\0")
            digest.update(hashlib.sha256(target.read_bytes()).digest())
            target.chmod(0o444)
    for d in sorted(p for p in dest.rglob("*") if p.is_dir()):
        d.chmod(0o555)
    dest.chmod(0o555)
    return Bundle(path=dest, sha256=digest.hexdigest(), size=total, files=count)
