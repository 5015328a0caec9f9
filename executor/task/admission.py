"""Admission: how many sandboxes may be starting at once on this host, and the line the others wait in.

Starting a sandbox is the host's most expensive moment: the engine creates
and starts a container, and the sandbox boots an interpreter, grpc and the
policy's ``preload`` modules. A burst of tasks larger than the host can boot
at once used to start them all together; on 2 cores, 80 tasks at once booted
so slowly that many were judged frozen. Now a task takes a *start permit*
before its container is created and gives it back once the sandbox's first
heartbeat is seen (or the container ends); tasks beyond the limit wait in
line, first come first served, and their wall clock has not started. A warm
pool's refill takes permits too, but only when no task waits.

Permits are host-wide, not per executor: each is an ``flock`` on one of
``limit`` files in a directory every executor of the host shares (beside the
uid leases, :func:`executor.task.uids.default_uid_dir`), so several processes (a
CLI per task, say) share one budget, and a permit ends with its process even
if that process is killed. Within a process the waiters are served in order;
across processes the head of each line tries the files in turn.

A line may be bounded (``max_queued``): a task that finds it full is refused
at once with a :class:`~executor.errors.CapacityError`, never left to an
unbounded backlog.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, TypeVar

from executor.errors import CapacityError, host_errors
from executor.task.flocks import HeldLock, try_lock

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

log = logging.getLogger(__name__)

T = TypeVar("T")

STARTS_DIR_NAME = "starting"
"""The subdirectory of the host-wide lock directory that holds the start permits."""
MAX_STARTING = 64
"""The most permits a gate may have: each is a sandbox booting at once."""
_HOST_POLL_S = 0.05
"""How often the head of the line looks for a permit another process gave back (not notified)."""
_POLL_S = 0.25
"""How often a waiter runs its ``poll`` (e.g. looks for a warm slot) besides being woken."""


def default_max_starting() -> int:
    """Sandboxes that may boot at once by default: two per CPU this process may use, at least 2."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(2, min(MAX_STARTING, 2 * cpus))


class Permit(HeldLock):
    """One sandbox's right to be starting; :meth:`release` it once the sandbox booted (or ended).

    Attributes:
        index: Which of the host's permit files it holds.
        waited_s: How long the task waited in line for it.
    """

    def __init__(self, gate: StartGate, fd: int, index: int, waited_s: float) -> None:
        super().__init__(fd)
        self._gate = gate
        self.index = index
        self.waited_s = waited_s

    def _released(self) -> None:
        self._gate._released()


class StartGate:
    """At most ``limit`` sandboxes starting at once on this host; the rest wait in line.

    Args:
        limit: Permits in all (see :func:`default_max_starting`), 1 to
            :data:`MAX_STARTING`.
        lock_dir: The host-wide directory of permit files (made 0700).
        max_queued: Tasks of this process that may wait in line at once;
            ``None`` for no bound. One more is refused with ``CapacityError``.
    """

    def __init__(self, limit: int, lock_dir: Path, *, max_queued: int | None = None) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_STARTING:
            raise ValueError(f"max_starting: expected an integer from 1 to {MAX_STARTING}, got {limit!r}")
        if max_queued is not None and (
            isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 0
        ):
            raise ValueError(f"max_queued: expected None or an integer of 0 or more, got {max_queued!r}")
        self.limit = limit
        self.lock_dir = lock_dir
        self.max_queued = max_queued
        self._cond = threading.Condition()
        self._line: deque[int] = deque()
        self._tickets = itertools.count()
        self._held = 0
        self.admitted = 0
        self.refused = 0

    @property
    def waiting(self) -> int:
        """Tasks of this process waiting in line now."""
        with self._cond:
            return len(self._line)

    @property
    def starting(self) -> int:
        """Permits this process holds now."""
        with self._cond:
            return self._held

    def stats(self) -> dict[str, int | None]:
        """The gate's figures: limit, queue bound, waiting, starting, admitted, refused."""
        with self._cond:
            return {
                "max_starting": self.limit,
                "max_queued": self.max_queued,
                "waiting": len(self._line),
                "starting": self._held,
                "admitted": self.admitted,
                "refused": self.refused,
            }

    def notify(self) -> None:
        """Wake the waiters now (something their ``poll`` looks for may be there, e.g. a warm slot)."""
        with self._cond:
            self._cond.notify_all()

    def acquire(
        self,
        *,
        cancel: threading.Event | None = None,
        poll: Callable[[], T | None] | None = None,
    ) -> Permit | T | None:
        """Wait in line for a permit; or take what ``poll`` finds first; ``None`` if cancelled.

        Args:
            cancel: Set it to leave the line (the task was cancelled).
            poll: Called whenever the waiter wakes; a value other than ``None``
                is returned at once instead of a permit (a warm slot that
                became ready while the task waited).

        Raises:
            CapacityError: The line is full (``max_queued``).
            HostError: The permit directory cannot be made.
        """
        with host_errors("make the start permit directory", self.lock_dir):
            self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        queued_at = time.monotonic()
        with self._cond:
            if self.max_queued is not None and len(self._line) >= self.max_queued and not self._free_here():
                self.refused += 1
                raise CapacityError(
                    f"the executor's start queue is full: {len(self._line)} tasks already wait for one "
                    f"of {self.limit} start permits (max_queued={self.max_queued}); retry later"
                )
            ticket = next(self._tickets)
            self._line.append(ticket)
        try:
            while True:
                if cancel is not None and cancel.is_set():
                    return None
                if poll is not None:
                    found = poll()
                    if found is not None:
                        return found
                with self._cond:
                    head = self._line[0] == ticket
                    if head and self._held < self.limit:
                        got = self._try_host()
                        if got is not None:
                            fd, index = got
                            self._held += 1
                            self.admitted += 1
                            self._line.popleft()
                            self._cond.notify_all()  # the next one is head now
                            return Permit(self, fd, index, time.monotonic() - queued_at)
                    # The head polls for permits other processes give back; the
                    # rest are woken by releases and by the head moving on.
                    self._cond.wait(_HOST_POLL_S if head else _POLL_S)
        finally:
            with self._cond:
                with contextlib.suppress(ValueError):
                    self._line.remove(ticket)
                self._cond.notify_all()

    def try_acquire(self) -> Permit | None:
        """A permit now for background work (a warm pool's refill), or ``None``.

        Never ahead of a task in line: with anyone waiting the answer is ``None``.

        Raises:
            HostError: The permit directory cannot be made.
        """
        with host_errors("make the start permit directory", self.lock_dir):
            self.lock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._cond:
            if self._line or self._held >= self.limit:
                return None
            got = self._try_host()
            if got is None:
                return None
            self._held += 1
            return Permit(self, got[0], got[1], 0.0)

    def _free_here(self) -> bool:
        """Whether a permit may be free for a task arriving now (no one waits and this process has room)."""
        return not self._line and self._held < self.limit

    def _try_host(self) -> tuple[int, int] | None:
        """Lock one of the host's permit files; ``(fd, index)`` or ``None`` if all are held."""
        for index in range(self.limit):
            fd = try_lock(self.lock_dir / f"start-{index}.lock")
            if fd is not None:
                return fd, index
        return None

    def _released(self) -> None:
        with self._cond:
            self._held -= 1
            self._cond.notify_all()
