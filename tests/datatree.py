"""Datasource trees for the data room's tests: files, their names, and running a check as a non-root user."""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from executor.data.scan import FileStamp

GID = 10_001
NOBODY = 65_534
IS_ROOT = os.geteuid() == 0


def write(root: Path, name: str, content: str = "x") -> Path:
    """A file ``name`` under ``root`` holding ``content``, its directories made."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def names(files: list[FileStamp] | tuple[FileStamp, ...]) -> list[str]:
    """The files' names, in their order."""
    return [f.name for f in files]


def tree(root: Path) -> set[str]:
    """Every file and symlink under ``root``, as relative names (directories implied)."""
    found = set()
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


@contextlib.contextmanager
def shared_tmp() -> Iterator[Path]:
    """A directory in /tmp that another user can reach, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="se-dv-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for dirpath, dirs, _ in os.walk(path):
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(dirpath, d), 0o700)
        shutil.rmtree(path, ignore_errors=True)


def as_unprivileged(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as a non-root user: directly if we are not root, else in a child as nobody."""
    if not IS_ROOT:
        return fn()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(reader)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = pickle.dumps(("ok", fn()))
        except BaseException as exc:
            payload = pickle.dumps(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        with os.fdopen(writer, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as f:
        payload = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(payload)
    if kind == "error":
        raise AssertionError(f"in the unprivileged child: {value}")
    return value
