"""Host-wide claims held as ``flock`` locks on files: a uid lease, a start permit.

Every executor process on the host sees the same lock files, and a claim ends
with the process that holds it even if that process is killed (the kernel
drops its locks), so nothing needs cleaning up after a crash. The files
themselves stay (empty, one per uid or permit ever used); only the locks
matter.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType

log = logging.getLogger(__name__)


def try_lock(path: Path) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock, or ``None`` if another holds it.

    The file is made 0600 if missing, never through a symbolic link. One that
    cannot be opened counts as held (and is logged at debug).
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        log.debug("cannot open %s (%s); treating it as held", path, exc.strerror)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


class HeldLock:
    """A claim held by an open descriptor's lock; :meth:`release` (or leave the ``with``) to end it."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._lock = threading.Lock()

    @property
    def held(self) -> bool:
        """Whether the claim is still held."""
        return self._fd is not None

    def release(self) -> None:
        """Give the claim back; safe to call more than once."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the flock
            self._released()

    def _released(self) -> None:
        """Called once, after the lock is dropped (a subclass tells whoever waits)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
