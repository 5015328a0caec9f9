"""One task's events on their way to its hooks: progress steps coalesced, and a total per task.

A protocol decides how often it reports progress and how much it prints; what
that costs the parent, its hooks and an ``--events`` file must not be up to
it. :class:`TaskEvents` stands between a task and its
:class:`~executor.hooks.HookDispatcher`:

- **Steps are coalesced.** At most one ``step`` progress event per
  :data:`~executor.sandbox.contract.PROGRESS_STEP_INTERVAL_S` goes on; one
  coming sooner waits, replaced by any later one, and goes on when the
  interval is up (from a thread of the task's, or at once with the next step
  after it), or before the next event of any other kind, whichever comes
  first. So the last step before a boundary, a batch's end or a pause is
  never lost, and a hook sees steps in order.
- **Boundaries pass.** ``run_start``, ``run_end``, ``epoch_start`` and
  ``epoch_end`` go on as they come; what bounds them is the price of a
  progress call in the sandbox's call budget (:mod:`executor.rpc.limits`).
- **Every report, one way.** Whatever kind of event the sandbox reports
  (:class:`~executor.events.Report`) goes on bound to its task and batch,
  with no wiring per kind; only steps are coalesced.
- **A total per task.** Reported and log-line events handed to hooks count
  against :data:`MAX_TASK_EVENTS`; when it is reached, one ``log_line`` note
  on the stream ``executor`` says so, later ones are dropped and counted, and
  a second note just before ``task_ended`` gives the count. The events of
  the task's life (``task_started``, ``results_saved``, ``batch_run``,
  ``failed_files_saved``, ``task_ended``) always pass: they are bounded by
  its batches.

The ``on_progress`` listener of :meth:`executor.runner.Executor.run` gets
the same coalesced progress events (not subject to the total: it queues
nothing).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from executor.data.logtail import NOTE_STREAM
from executor.events import (
    AlgorithmProgress,
    Event,
    LogLine,
    ProgressKind,
    ProgressUpdate,
    Report,
    TaskContext,
    TaskEnded,
)
from executor.sandbox.contract import PROGRESS_STEP_INTERVAL_S

if TYPE_CHECKING:
    from collections.abc import Callable

    from executor.hooks import HookDispatcher, HookStats

log = logging.getLogger(__name__)

MAX_TASK_EVENTS = 200_000
"""Progress and log-line events one task may hand its hooks (an ``--events`` file); later ones are dropped."""


@dataclass(frozen=True)
class EventStats:
    """What became of a task's progress and log-line events.

    Attributes:
        passed: Handed to the hooks (counted against the total).
        coalesced: Steps replaced by a later one before they went on.
        dropped: Not handed to the hooks: the task's total was reached.
    """

    passed: int = 0
    coalesced: int = 0
    dropped: int = 0


class TaskEvents:
    """Hands one task's events to its hooks, coalescing steps and keeping the task's total.

    Safe from several threads: the task's own, the sandbox's server threads
    (progress) and its output follower (log lines). Never blocks on a hook.

    Args:
        dispatcher: The task's hook dispatcher.
        context: The task, for the notes this makes.
        on_progress: The orchestrator's listener for progress updates, if any.
        max_events: Progress and log-line events handed on per task.
        step_interval_s: At most one step per this interval goes on.
        clock: Seconds, monotonic (tests inject one).
        flush_thread: Whether a waiting step goes on by itself when its
            interval is up (tests that drive ``clock`` turn this off).
    """

    def __init__(
        self,
        dispatcher: HookDispatcher,
        context: TaskContext,
        *,
        on_progress: Callable[[ProgressUpdate], None] | None = None,
        max_events: int = MAX_TASK_EVENTS,
        step_interval_s: float = PROGRESS_STEP_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        flush_thread: bool = True,
    ) -> None:
        self._dispatcher = dispatcher
        self._flush_thread = flush_thread
        self._context = context
        self._on_progress = on_progress
        self._max = max_events
        self._interval = step_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._due = threading.Condition(self._lock)
        # Keeps the listener's calls in the order the events went on.
        self._listener_lock = threading.Lock()
        self._pending: AlgorithmProgress | None = None
        self._last_step: float | None = None
        self._flusher: threading.Thread | None = None
        self._closed = False
        self._passed = 0
        self._coalesced = 0
        self._dropped = 0
        self._batch = 0

    # -- the three kinds of events -------------------------------------------------
    def emit(self, event: Event) -> None:
        """An event of the task's life: always handed on, after any step still waiting."""
        with self._lock:
            ready = self._take_pending()
            if isinstance(event, TaskEnded) and self._dropped:
                self._note(
                    f"[executor: {self._dropped} progress and log events were not handed to hooks: "
                    f"over the task's total of {self._max}]"
                )
            self._dispatcher.emit(event)
        self._tell_listener(ready)

    def report(self, report: Report, batch: int) -> None:
        """An event the sandbox reported in ``batch``, of any kind: a step may wait; others go on."""
        event = report.bound(self._context, batch)
        with self._lock:
            self._batch = batch
            if isinstance(event, AlgorithmProgress) and event.kind is ProgressKind.STEP:
                now = self._clock()
                if self._last_step is None or now - self._last_step >= self._interval:
                    if self._pending is not None:  # superseded by this one, which goes now
                        self._pending = None
                        self._coalesced += 1
                    self._last_step = now
                    self._counted(event)
                    ready: list[Event] = [event]
                else:
                    if self._pending is not None:
                        self._coalesced += 1
                    self._pending = event
                    self._wake_flusher()
                    ready = []
            else:
                ready = self._take_pending()
                self._counted(event)
                ready.append(event)
        self._tell_listener(ready)

    def log_line(self, stream: str, line: str, batch: int) -> None:
        """A line of the sandbox's output (or a note of the parent's) that passed the output caps."""
        event = LogLine(task=self._context, stream=stream, line=line, batch=batch)
        with self._lock:
            self._batch = batch
            ready = self._take_pending()
            self._counted(event)
        self._tell_listener(ready)

    # -- end -------------------------------------------------------------------------
    def close(self, timeout_s: float) -> list[HookStats]:
        """Hand on a step still waiting, stop the flusher, and close the dispatcher (see its ``close``)."""
        with self._lock:
            ready = self._take_pending()
            self._closed = True
            self._due.notify_all()
        self._tell_listener(ready)
        return self._dispatcher.close(timeout_s)

    @property
    def stats(self) -> EventStats:
        """The counts so far."""
        with self._lock:
            return EventStats(passed=self._passed, coalesced=self._coalesced, dropped=self._dropped)

    # -- inside (lock held) --------------------------------------------------------
    def _counted(self, event: Event) -> bool:
        """Hand ``event`` to the hooks within the task's total; whether it went on."""
        if self._passed >= self._max:
            self._dropped += 1
            if self._dropped == 1:
                log.warning(
                    "task %s: %d progress and log events reached; later ones are not handed to hooks",
                    self._context.task_id,
                    self._max,
                )
                self._note(
                    f"[executor: the task's event total reached ({self._max} progress and log events); "
                    "later ones are not handed to hooks]"
                )
            return False
        self._passed += 1
        self._dispatcher.emit(event)
        return True

    def _note(self, text: str) -> None:
        """A note of the parent's, outside the total (at most two per task)."""
        self._dispatcher.emit(LogLine(task=self._context, stream=NOTE_STREAM, line=text, batch=self._batch))

    def _take_pending(self) -> list[Event]:
        """Hand on the step waiting, if any; it, for the listener."""
        event, self._pending = self._pending, None
        if event is None:
            return []
        self._last_step = self._clock()
        self._counted(event)
        return [event]

    def _wake_flusher(self) -> None:
        if self._flusher is None and not self._closed and self._flush_thread:
            self._flusher = threading.Thread(
                target=self._flush_when_due, name=f"progress-{self._context.task_id}"[:60], daemon=True
            )
            self._flusher.start()
        self._due.notify()

    def _flush_when_due(self) -> None:
        """The flusher thread: a waiting step goes on once its interval is up."""
        while True:
            with self._lock:
                while not self._closed and self._pending is None:
                    self._due.wait()
                if self._closed:
                    return
                last = self._last_step if self._last_step is not None else self._clock()
                wait = last + self._interval - self._clock()
                if wait > 0:
                    self._due.wait(wait)
                    continue
                ready = self._take_pending()
            self._tell_listener(ready)

    # -- the listener ----------------------------------------------------------------
    def _tell_listener(self, events: list[Event]) -> None:
        if self._on_progress is None:
            return
        with self._listener_lock:
            for event in events:
                if not isinstance(event, AlgorithmProgress):
                    continue
                try:
                    self._on_progress(event)
                except Exception:  # the orchestrator's listener must not fail the sandbox's call
                    log.exception("task %s: the progress listener failed", self._context.task_id)
