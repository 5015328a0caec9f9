"""Sandbox uids: each live task runs as a uid no other live task on the host has.

Under runc every sandbox shares the host's user namespace, and the kernel keeps
some limits per user, not per container: inotify instances and watches, POSIX
message-queue bytes, pipe pages, epoll watches, pending signals. Tasks that
shared one uid shared those pools, so one task could starve the others. A
lease gives a task a uid of its own for as long as it runs.

Leases are ``flock`` locks on one file per uid in a host-wide directory, so two
executor instances on the host never hand out the same uid, and a lease ends
with its process even if that process is killed. The files themselves stay
(empty, one per uid ever used); only the locks matter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import TYPE_CHECKING

from executor import paths
from executor.errors import CapacityError, host_errors
from executor.task.flocks import HeldLock, try_lock

if TYPE_CHECKING:
    from pathlib import Path

    from executor.policy import IsolationPolicy

log = logging.getLogger(__name__)


class UidLease(HeldLock):
    """One uid held for one task; release it (or leave the ``with``) when the task ends."""

    def __init__(self, uid: int, fd: int) -> None:
        super().__init__(fd)
        self.uid = uid


class UidPool:
    """Hands out uids from a policy's range, never one a live task holds.

    Args:
        lock_dir: The host-wide directory of lock files; see :func:`paths.uid_dir`.
    """

    def __init__(self, lock_dir: Path | None = None) -> None:
        self.lock_dir = lock_dir or paths.uid_dir()
        self._cursor = 0
        self._cursor_lock = threading.Lock()

    def lease(self, policy: IsolationPolicy) -> UidLease:
        """A uid from ``policy``'s range that no other live task holds.

        Raises:
            CapacityError: Every uid of the range is held by a live task.
            HostError: The host refused the lock directory (a file in the way, no permission).
        """
        uids = policy.uid_range
        with host_errors("make the uid lock directory", self.lock_dir):
            self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._cursor_lock:
            # Start after the uid handed out last, so a uid just given back is
            # the last to be reused.
            first = self._cursor % len(uids)
        for i in range(len(uids)):
            index = (first + i) % len(uids)
            uid = uids[index]
            fd = self._try_lock(uid)
            if fd is not None:
                with self._cursor_lock:
                    self._cursor = index + 1
                return UidLease(uid, fd)
        if policy.uid is not None:
            raise CapacityError(
                f"sandbox uid {policy.uid} (pinned by the policy's uid) is in use by another live task; "
                "leave uid unset to give each task a uid of its own from uid_start/uid_count"
            )
        raise CapacityError(
            f"no free sandbox uid: all {len(uids)} uids from {uids[0]} to {uids[-1]} "
            "(the policy's uid_start and uid_count) are in use by live tasks on this host; "
            "retry when one ends, or raise uid_count"
        )

    def _try_lock(self, uid: int) -> int | None:
        fd = try_lock(self.lock_dir / f"{uid}.lock")
        if fd is not None:
            with contextlib.suppress(OSError):
                # For an operator wondering who holds it; never read by the code.
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
        return fd
