"""Turn a protocol directory into the read-only bundle a sandbox imports.

The parent never imports or runs protocol code (design invariant 2). It only
copies the files, refusing anything that could reach outside the bundle
(symlinks, hard links, devices, sockets, FIFOs), and parses ``protocol.py`` with :mod:`ast` (which
executes nothing) so that a missing ``run`` is reported before a container
starts.
"""

from __future__ import annotations

import ast
import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from executor.errors import ProtocolBundleError
from executor.sandbox.contract import ENTRY_MODULE

ENTRY_FILE = f"{ENTRY_MODULE}.py"
MAX_BUNDLE_BYTES = 64 * 1024 * 1024
MAX_BUNDLE_FILES = 10_000
MAX_ENTRY_BYTES = 4 * 1024 * 1024
_PARSE_LOCK = threading.Lock()
MAX_BUNDLE_DIRS = 1_000
MAX_BUNDLE_DEPTH = 32
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
    source_bytes = entry.read_bytes()
    try:
        # One parse at a time in this process: CPython 3.11 (before 3.11.8)
        # keeps the AST builder's recursion depth in shared state, so two
        # threads parsing at once (tasks started concurrently) can fail with
        # "SystemError: AST constructor recursion depth mismatch".
        with _PARSE_LOCK:
            tree = ast.parse(source_bytes, filename=str(entry))
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

    ``source`` is checked first by the caller (:func:`check_protocol_dir`,
    before anything is made for the task): its entry file is parsed once.
    The source is read through descriptors only: every entry is opened without
    following links and checked on the open descriptor, so a file or directory
    swapped for a symlink, FIFO or device while the copy runs is refused, not
    followed. Files become world-readable and read-only so that the sandbox's
    unprivileged user can import them; directories become traversable.

    Raises:
        ProtocolBundleError: The directory cannot be opened, holds a symlink, special
            file or hard-linked file, changed during the copy, or exceeds the size,
            file-count or depth limits.
    """
    dest.mkdir(mode=0o755)
    copier = _Copier(dest)
    try:
        # The operator's own directory may be reached through a link; nothing under it may.
        root_fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProtocolBundleError(f"cannot open protocol directory {source}: {exc.strerror}") from None
    try:
        copier.copy_dir(root_fd, PurePosixPath())
    finally:
        os.close(root_fd)
    for d in sorted(p for p in dest.rglob("*") if p.is_dir()):
        d.chmod(0o555)
    dest.chmod(0o555)
    return Bundle(path=dest, sha256=copier.digest.hexdigest(), size=copier.total, files=copier.count)


def link_bundle(bundle: Bundle, dest: Path) -> None:
    """Show ``bundle`` (the parent's own checked copy) at ``dest``, an empty directory, by hard links.

    For a warm slot's ``protocol/`` directory: nothing is copied or hashed
    again. The files are the copy's own inodes, root's (or the parent's) and
    read-only; the directories are made anew, read and search only. Both
    live in the run directory, so the links cannot cross filesystems.

    Raises:
        OSError: The host refused a directory or a link.
    """
    if any(dest.iterdir()):
        raise ProtocolBundleError(f"cannot show the protocol in {dest}: it is not empty")
    dest.chmod(0o700)
    made = [dest]
    for root, dirs, files in os.walk(bundle.path):
        rel = Path(root).relative_to(bundle.path)
        for name in dirs:
            (dest / rel / name).mkdir(mode=0o700)
            made.append(dest / rel / name)
        for name in files:
            os.link(Path(root) / name, dest / rel / name, follow_symlinks=False)
    for d in reversed(made):
        d.chmod(0o555)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO swapped in after the check opens at once instead of waiting for a writer.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CHUNK = 1024 * 1024


def _open_at(dir_fd: int, name: str, flags: int, rel: PurePosixPath, kind: str) -> int:
    """``name`` in ``dir_fd``, opened without following a link swapped in since it was checked."""
    try:
        return os.open(name, flags, dir_fd=dir_fd)
    except OSError:
        raise ProtocolBundleError(
            f"protocol bundle changed during the copy (symlink or not {kind}): {rel}"
        ) from None


class _Copier:
    """Copies one bundle, keeping the totals and digest across directories."""

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self.digest = hashlib.sha256()
        self.total = 0
        self.count = 0
        self.dirs = 0

    def copy_dir(self, dir_fd: int, rel_dir: PurePosixPath) -> None:
        """Copy the files of ``dir_fd``, then its subdirectories (the digest's order)."""
        if len(rel_dir.parts) > MAX_BUNDLE_DEPTH:
            raise ProtocolBundleError(f"protocol bundle nests deeper than {MAX_BUNDLE_DEPTH} directories")
        subdirs: list[str] = []
        for name in sorted(os.listdir(dir_fd)):
            rel = rel_dir / name
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise ProtocolBundleError(f"protocol bundle may not contain symlinks: {rel}")
            if stat.S_ISDIR(st.st_mode):
                if name not in _SKIP_DIRS:
                    subdirs.append(name)
            elif stat.S_ISREG(st.st_mode):
                self._copy_file(dir_fd, name, rel)
            else:
                raise ProtocolBundleError(f"protocol bundle may contain only regular files, not {rel}")
        for name in subdirs:
            rel = rel_dir / name
            self.dirs += 1
            if self.dirs > MAX_BUNDLE_DIRS:
                raise ProtocolBundleError(f"protocol bundle has more than {MAX_BUNDLE_DIRS} directories")
            fd = _open_at(dir_fd, name, _DIR_FLAGS, rel, "a directory")
            try:
                (self.dest / rel).mkdir(mode=0o755)
                self.copy_dir(fd, rel)
            finally:
                os.close(fd)

    def _copy_file(self, dir_fd: int, name: str, rel: PurePosixPath) -> None:
        self.count += 1
        if self.count > MAX_BUNDLE_FILES:
            raise ProtocolBundleError(f"protocol bundle has more than {MAX_BUNDLE_FILES} files")
        fd = _open_at(dir_fd, name, _FILE_FLAGS, rel, "a regular file")
        try:
            # The descriptor, not the name checked a moment ago, is what gets copied.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ProtocolBundleError(f"protocol bundle may contain only regular files, not {rel}")
            if st.st_nlink != 1:
                # A hard link can name a file the operator never meant to share
                # (one readable only by root); its copy would be world-readable.
                raise ProtocolBundleError(f"protocol bundle may not contain hard-linked files: {rel}")
            self.total += st.st_size
            if self.total > MAX_BUNDLE_BYTES:
                raise ProtocolBundleError(f"protocol bundle exceeds {MAX_BUNDLE_BYTES} bytes")
            content = hashlib.sha256()
            target = self.dest / rel
            with open(target, "xb") as fout:
                left = st.st_size
                while left > 0:
                    chunk = os.read(fd, min(_CHUNK, left))
                    if not chunk:
                        raise ProtocolBundleError(f"protocol bundle changed during the copy: {rel} shrank")
                    fout.write(chunk)
                    content.update(chunk)
                    left -= len(chunk)
                if os.read(fd, 1):
                    raise ProtocolBundleError(f"protocol bundle changed during the copy: {rel} grew")
            target.chmod(0o444)
        finally:
            os.close(fd)
        self.digest.update(os.fsencode(rel.as_posix()) + b"\0")
        self.digest.update(content.digest())
