"""A task's events on their way to its hooks: steps coalesced, boundaries kept, a total per task."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import pytest

from executor.events import ProgressKind, ProgressUpdate
from executor.hooks import (
    AlgorithmProgress,
    BatchRun,
    Event,
    HookDispatcher,
    LogLine,
    TaskContext,
    TaskEnded,
    TaskStarted,
)
from executor.outcome import Outcome, Status
from executor.sandbox.contract import PROGRESS_STEP_INTERVAL_S
from executor.task.eventflow import MAX_TASK_EVENTS, TaskEvents
from tests.unit.conftest import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

CTX = TaskContext(task_id="t-1", task_hash="h", project="p", modeller="m", datasource="d")


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Rig:
    """A TaskEvents over a real dispatcher whose one hook records; the listener records too."""

    def __init__(self, clock: Callable[[], float], **options: object) -> None:
        self.got: list[Event] = []
        self.heard: list[ProgressUpdate] = []
        options.setdefault("flush_thread", False)  # the test drives the clock
        self.events = TaskEvents(
            HookDispatcher([self.got.append]),
            CTX,
            on_progress=self.heard.append,
            clock=clock,
            **options,  # type: ignore[arg-type]
        )

    def close(self) -> list[Event]:
        """Close (hooks drained) and return what the hook got."""
        self.events.close(5.0)
        return self.got


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def rig(clock: Clock) -> Iterator[Rig]:
    made = Rig(clock)
    yield made
    made.events.close(5.0)


def step(n: int) -> ProgressUpdate:
    return ProgressUpdate(ProgressKind.STEP, current=n, total=1000)


def kinds(events: list[Event]) -> list[str]:
    out = []
    for e in events:
        if isinstance(e, AlgorithmProgress):
            out.append(f"{e.update.kind.value.lower()}{e.update.current or ''}")
        else:
            out.append(e.event)
    return out


def test_steps_coming_faster_than_the_interval_are_coalesced_to_the_latest(rig: Rig, clock: Clock) -> None:
    # Finding 4 of the third red team: every step became an event for every
    # hook (1.45 MB/s to --events) and half a core of the parent.
    for n in range(1, 101):  # all at one instant
        rig.events.report(step(n), 1)
    clock.now += PROGRESS_STEP_INTERVAL_S
    rig.events.report(step(101), 1)  # the interval is up: this one goes, superseding the waiting one
    rig.events.report(step(102), 1)  # and this one waits again
    rig.events.emit(BatchRun(task=CTX, datasource_name="d", statistics={}, batch_number=1, total_batches=1))
    assert kinds(rig.close()) == ["step1", "step101", "step102", "batch_run"]
    assert rig.events.stats.coalesced == 99  # 2..100
    assert [u.current for u in rig.heard] == [1, 101, 102]


def test_a_boundary_goes_on_at_once_after_the_step_waiting_before_it(rig: Rig) -> None:
    rig.events.report(ProgressUpdate(ProgressKind.RUN_START), 1)
    for n in range(1, 4):
        rig.events.report(step(n), 1)
    rig.events.report(ProgressUpdate(ProgressKind.EPOCH_END, current_epoch=1, max_epochs=2), 1)
    rig.events.report(ProgressUpdate(ProgressKind.EPOCH_START, current_epoch=2, max_epochs=2), 1)
    rig.events.report(ProgressUpdate(ProgressKind.RUN_END), 1)
    assert kinds(rig.close()) == ["run_start", "step1", "step3", "epoch_end", "epoch_start", "run_end"]


def test_a_log_line_and_the_end_hand_on_the_waiting_step_first(rig: Rig) -> None:
    rig.events.report(step(1), 1)
    rig.events.report(step(2), 1)
    rig.events.log_line("stdout", "hello", 1)
    rig.events.report(step(3), 1)
    assert kinds(rig.close()) == ["step1", "step2", "log_line", "step3"]


def test_a_waiting_step_goes_on_by_itself_when_its_interval_is_up() -> None:
    # A protocol that reports 10 steps at once and then works for an hour must
    # not leave its bar at the first one.
    r = Rig(time.monotonic, step_interval_s=0.05, flush_thread=True)
    try:
        for n in range(1, 11):
            r.events.report(step(n), 1)
        assert wait_for(lambda: [u.current for u in r.heard] == [1, 10])
    finally:
        got = r.close()
    assert [e.update.current for e in got if isinstance(e, AlgorithmProgress)] == [1, 10]


def test_the_task_s_total_drops_progress_and_log_events_with_two_notes_and_keeps_its_life(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    r = Rig(clock, max_events=5)
    r.events.emit(TaskStarted(task=CTX, selection={}, total_batches=1, runtime="runc"))
    with caplog.at_level(logging.WARNING, logger="executor.task.eventflow"):
        for n in range(8):
            r.events.log_line("stdout", f"line {n}", 1)
        r.events.report(ProgressUpdate(ProgressKind.RUN_END), 1)
    r.events.emit(BatchRun(task=CTX, datasource_name="d", statistics={}, batch_number=1, total_batches=1))
    r.events.emit(TaskEnded(task=CTX, outcome=Outcome("t-1", Status.OK)))
    got = r.close()
    lines = [e.line for e in got if isinstance(e, LogLine)]
    assert lines == [
        *(f"line {n}" for n in range(5)),
        "[executor: the task's event total reached (5 progress and log events); later ones are not handed "
        "to hooks]",
        "[executor: 4 progress and log events were not handed to hooks: over the task's total of 5]",
    ]
    assert [e.stream for e in got if isinstance(e, LogLine)][-2:] == ["executor", "executor"]
    assert kinds(got)[0] == "task_started"
    assert kinds(got)[-3:] == ["batch_run", "log_line", "task_ended"]  # the count just before the end
    assert (r.events.stats.passed, r.events.stats.dropped) == (5, 4)
    assert [u.kind for u in r.heard] == [ProgressKind.RUN_END]  # the listener queues nothing: not capped
    assert caplog.text.count("later ones are not handed to hooks") == 1
    assert MAX_TASK_EVENTS == 200_000


def test_a_failing_listener_is_logged_and_the_events_still_go_on(clock: Clock, caplog) -> None:
    got: list[Event] = []

    def broken(update: ProgressUpdate) -> None:
        raise RuntimeError("listener broke")

    events = TaskEvents(HookDispatcher([got.append]), CTX, on_progress=broken, clock=clock)
    with caplog.at_level(logging.ERROR, logger="executor.task.eventflow"):
        events.report(ProgressUpdate(ProgressKind.RUN_START), 1)
    events.close(5.0)
    assert kinds(got) == ["run_start"]
    assert "the progress listener failed" in caplog.text
