"""The dispatcher that shields tasks from a pod orchestrator's hooks, and the ``--events`` hook.

A *hook* is any callable taking an event (the typed events of
:mod:`executor.events`, which this module also names for its callers).

:class:`HookDispatcher` gives each hook a thread and a bounded queue of its
own: a hook that raises is logged and keeps receiving; a hook that blocks
stalls only itself; :meth:`~HookDispatcher.emit` never blocks the task, and
:meth:`~HookDispatcher.close` never waits longer than its timeout.
:class:`EventsFile` is the built-in hook behind ``--events FILE``.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from executor.errors import HostError
from executor.events import AlgorithmProgress as AlgorithmProgress
from executor.events import BatchRun as BatchRun
from executor.events import Event as Event
from executor.events import FailedFilesSaved as FailedFilesSaved
from executor.events import LogLine as LogLine
from executor.events import ResultsSaved as ResultsSaved
from executor.events import TaskContext as TaskContext
from executor.events import TaskEnded as TaskEnded
from executor.events import TaskStarted as TaskStarted

log = logging.getLogger(__name__)

DEFAULT_QUEUE_SIZE = 10_000
"""Events one hook may have waiting; beyond it new events are dropped for that hook (counted)."""
MAX_LOGGED_FAILURES = 3
"""Failures of one hook logged with their traceback; later ones are only counted."""


Hook = Callable[[Event], object]
"""A hook: called with each event, in emit order, on a thread of its own."""


def hook_name(hook: Hook) -> str:
    """A readable name for ``hook`` in logs and stats."""
    name = getattr(hook, "__qualname__", None)
    return str(name) if name else type(hook).__qualname__


@dataclass(frozen=True)
class HookStats:
    """What became of the events emitted to one hook.

    Attributes:
        hook: The hook's name.
        delivered: Events the hook took without raising.
        failed: Events the hook raised on (logged, then counted).
        dropped: Events never queued: the hook's queue was full, or the
            dispatcher was already closed.
        undelivered: Events still queued when ``close`` gave up on the hook.
        abandoned: Whether ``close`` left the hook still busy (blocked).
    """

    hook: str
    delivered: int
    failed: int
    dropped: int
    undelivered: int = 0
    abandoned: bool = False


_STOP = object()


class _Worker:
    """One hook's queue and daemon thread."""

    def __init__(self, hook: Hook, queue_size: int) -> None:
        self.hook = hook
        self.name = hook_name(hook)
        self.queue_size = queue_size
        # Unbounded itself: offer() keeps the bound (under the dispatcher's
        # lock), so the stop marker always fits.
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self.abandoned = False
        self._counts = threading.Lock()
        self.thread = threading.Thread(target=self._run, name=f"hook-{self.name}"[:60], daemon=True)
        self.thread.start()

    def offer(self, event: Event) -> None:
        """Queue ``event`` unless the queue is full (then count and, the first time, log it)."""
        if self.queue.qsize() >= self.queue_size:
            with self._counts:
                self.dropped += 1
                first = self.dropped == 1
            if first:
                log.warning(
                    "hook %s is behind: %d events are waiting for it; later events are dropped "
                    "for it and counted",
                    self.name,
                    self.queue_size,
                )
            return
        self.queue.put(event)

    def count_dropped(self) -> None:
        with self._counts:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is _STOP or self.abandoned:
                return
            try:
                self.hook(cast("Event", item))
            except BaseException:  # a hook's SystemExit must not end its worker silently either
                with self._counts:
                    self.failed += 1
                    failed = self.failed
                if failed <= MAX_LOGGED_FAILURES:
                    log.exception("hook %s failed on %s", self.name, getattr(item, "event", "?"))
                    if failed == MAX_LOGGED_FAILURES:
                        log.error("hook %s: its later failures are counted, not logged", self.name)
            else:
                with self._counts:
                    self.delivered += 1

    def stats(self, undelivered: int = 0) -> HookStats:
        with self._counts:
            return HookStats(
                hook=self.name,
                delivered=self.delivered,
                failed=self.failed,
                dropped=self.dropped,
                undelivered=undelivered,
                abandoned=self.abandoned,
            )

    def abandon(self) -> int:
        """Give up on the busy hook: drop what is queued for it and return how many events that was.

        Its thread ends when the hook returns, without delivering anything more.
        """
        self.abandoned = True
        undelivered = 0
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                undelivered += 1
        self.queue.put(_STOP)
        return undelivered


class HookDispatcher:
    """Delivers events to hooks without letting any hook fail or stall the task.

    Each hook gets a daemon thread and a queue of at most ``queue_size``
    events, so events reach it in emit order and a slow hook delays only
    itself. A hook that raises is logged (its first few failures with the
    traceback) and receives later events as usual. :meth:`emit` is safe from
    several threads and never blocks.

    Args:
        hooks: The hooks, each called with every event.
        queue_size: Events one hook may have waiting before new ones are
            dropped for it.
    """

    def __init__(self, hooks: Iterable[Hook], *, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        self._lock = threading.Lock()
        self._close_lock = threading.Lock()
        self._closed = False
        self._workers = [_Worker(hook, queue_size) for hook in hooks]
        self._stats: list[HookStats] | None = None

    def emit(self, event: Event) -> None:
        """Queue ``event`` for every hook; never blocks. After :meth:`close` it is dropped (counted)."""
        # One lock around the whole fan-out: every hook sees events in the same order.
        with self._lock:
            for worker in self._workers:
                if self._closed:
                    worker.count_dropped()
                else:
                    worker.offer(event)

    def close(self, timeout_s: float = 5.0) -> list[HookStats]:
        """Let the hooks take what is queued for up to ``timeout_s`` in all, then stop.

        A hook still busy at the deadline is abandoned: its thread is a daemon,
        its queued events are counted as undelivered and never delivered.
        Closing twice returns the first close's stats.

        Returns:
            One :class:`HookStats` per hook, in the order the hooks were given.
        """
        with self._close_lock:
            if self._stats is None:
                self._stats = self._close(timeout_s)
            return self._stats

    def _close(self, timeout_s: float) -> list[HookStats]:
        with self._lock:
            self._closed = True
            for worker in self._workers:
                worker.queue.put(_STOP)
        deadline = time.monotonic() + max(0.0, timeout_s)
        stats: list[HookStats] = []
        for worker in self._workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
            if worker.thread.is_alive():
                undelivered = worker.abandon()
                log.warning(
                    "hook %s did not finish within %.1f s; %d events were not delivered to it",
                    worker.name,
                    timeout_s,
                    undelivered,
                )
                stats.append(worker.stats(undelivered))
            else:
                stats.append(worker.stats())
        return stats

    def __enter__(self) -> HookDispatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EventsFile:
    """A hook writing each event as one JSON line (``--events FILE``).

    The file is opened for appending (created ``0600``), so several tasks may
    share it: each line is one ``write`` to an ``O_APPEND`` descriptor, which
    keeps lines whole. Nothing is buffered in this process: each line is
    handed to the kernel as the event arrives.

    Raises:
        HostError: The file cannot be opened or written.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._fd: int | None = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise HostError(f"cannot open the events file {self.path}: {exc.strerror or exc}") from None

    def __call__(self, event: Event) -> None:
        """Append ``event`` as one JSON line."""
        line = (json.dumps(event.to_dict(), default=str, separators=(",", ":")) + "\n").encode()
        with self._lock:
            if self._fd is None:
                raise HostError(f"the events file {self.path} is closed")
            view = memoryview(line)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                raise HostError(f"cannot write the events file {self.path}: {exc.strerror or exc}") from None

    def close(self) -> None:
        """Close the file; safe twice."""
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
