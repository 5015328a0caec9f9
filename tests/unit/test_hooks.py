"""Hooks: typed events, their JSON form, and a dispatcher no hook can fail or stall."""

from __future__ import annotations

import json
import logging
import stat
import threading
from datetime import UTC, datetime, timedelta, timezone

import pytest

from executor.errors import HostError
from executor.events import ProgressKind
from executor.hooks import (
    MAX_LOGGED_FAILURES,
    AlgorithmProgress,
    BatchRun,
    Event,
    EventsFile,
    FailedFilesSaved,
    HookDispatcher,
    LogLine,
    ResultsSaved,
    TaskContext,
    TaskEnded,
    TaskStarted,
)
from executor.outcome import ErrorDetail, Outcome, Status

CTX = TaskContext(task_id="t-1", task_hash="h" * 16, project="oncology", modeller="alice", datasource="ds")
WHEN = datetime(2024, 5, 1, 12, 30, 0, tzinfo=UTC)
TASK_FIELDS = {
    "task_id": "t-1",
    "task_hash": "h" * 16,
    "project": "oncology",
    "modeller": "alice",
    "datasource": "ds",
}


def line(n: int) -> LogLine:
    return LogLine(task=CTX, stream="stdout", line=f"line {n}", batch=1)


class Recorder:
    """A hook that keeps what it gets."""

    def __init__(self) -> None:
        self.got: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.got.append(event)


class Blocker:
    """A hook that blocks on every event until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        self.got: list[Event] = []

    def __call__(self, event: Event) -> None:
        self.entered.set()
        self.release.wait()
        self.got.append(event)


@pytest.fixture
def blocker():
    hook = Blocker()
    yield hook
    hook.release.set()  # let its daemon thread end


# -- events -----------------------------------------------------------------


def every_event() -> list[Event]:
    outcome = Outcome(
        task_id="t-1",
        status=Status.ERROR,
        runtime="runc",
        error=ErrorDetail(type="ValueError", message="bad"),
    )
    return [
        TaskStarted(
            task=CTX, time=WHEN, selection={"total": 5, "selected": 3}, total_batches=2, runtime="runc"
        ),
        AlgorithmProgress(
            ProgressKind.EPOCH_START, current_epoch=2, max_epochs=5, task=CTX, time=WHEN, batch=1
        ),
        BatchRun(
            task=CTX,
            time=WHEN,
            datasource_name="ds",
            statistics={"rows": 10, "failed": 1},
            batch_number=1,
            total_batches=2,
        ),
        ResultsSaved(task=CTX, time=WHEN, batch=1, rows=10),
        FailedFilesSaved(task=CTX, time=WHEN, files={"a.csv": "malformed"}),
        LogLine(task=CTX, time=WHEN, stream="stderr", line="warn\x1b[31m", batch=2),
        TaskEnded(task=CTX, time=WHEN, outcome=outcome),
    ]


def test_each_event_has_its_name_time_and_task_fields():
    names = [e.to_dict()["event"] for e in every_event()]
    assert names == [
        "task_started",
        "algorithm_progress",
        "batch_run",
        "results_saved",
        "failed_files_saved",
        "log_line",
        "task_ended",
    ]
    for event in every_event():
        d = event.to_dict()
        assert d["time"] == "2024-05-01T12:30:00+00:00"
        assert {k: d[k] for k in TASK_FIELDS} == TASK_FIELDS
        assert json.loads(json.dumps(d)) == d  # JSON-ready as it is


def test_event_fields_in_their_json_form():
    started, progress, batch, results, failed, log_line, ended = (e.to_dict() for e in every_event())
    assert (started["selection"], started["total_batches"], started["runtime"]) == (
        {"total": 5, "selected": 3},
        2,
        "runc",
    )
    assert {k: progress[k] for k in ("kind", "batch", "current_epoch", "min_epochs", "max_epochs")} == {
        "kind": "epoch_start",
        "batch": 1,
        "current_epoch": 2,
        "min_epochs": None,  # the sandbox's progress contract does not carry it
        "max_epochs": 5,
    }
    assert (batch["datasource_name"], batch["statistics"], batch["batch_number"], batch["total_batches"]) == (
        "ds",
        {"rows": 10, "failed": 1},
        1,
        2,
    )
    assert (results["batch"], results["rows"]) == (1, 10)
    assert (failed["files"], failed["total"], "truncated" in failed) == ({"a.csv": "malformed"}, 1, False)
    assert (log_line["stream"], log_line["line"], log_line["batch"]) == ("stderr", "warn\x1b[31m", 2)
    assert ended["outcome"] == every_event()[-1].outcome.to_dict()  # type: ignore[attr-defined]
    assert ended["outcome"]["error"]["type"] == "ValueError"


def test_a_step_keeps_its_info_and_counts():
    d = AlgorithmProgress(ProgressKind.STEP, current=3, total=9, info="loss 0.2", task=CTX, batch=2).to_dict()
    assert (d["kind"], d["current"], d["total"], d["info"], d["batch"]) == ("step", 3, 9, "loss 0.2", 2)


def test_failed_files_list_at_most_a_thousand_with_the_total():
    files = {f"f{i:05}.csv": "bad" for i in range(2500)}
    d = FailedFilesSaved(task=CTX, files=files).to_dict()
    assert len(d["files"]) == 1000
    assert list(d["files"]) == sorted(files)[:1000]
    assert (d["total"], d["truncated"]) == (2500, 1500)


def test_times_are_aware_and_utc():
    with pytest.raises(ValueError, match="timezone-aware"):
        ResultsSaved(task=CTX, time=datetime(2024, 5, 1, 12, 0), batch=1, rows=0)
    local = datetime(2024, 5, 1, 14, 30, tzinfo=timezone(timedelta(hours=2)))
    assert (
        ResultsSaved(task=CTX, time=local, batch=1, rows=0).to_dict()["time"] == "2024-05-01T12:30:00+00:00"
    )
    assert ResultsSaved(task=CTX, batch=1, rows=0).time.tzinfo is UTC


# -- dispatcher ---------------------------------------------------------------


def test_each_hook_gets_every_event_in_emit_order():
    first, second = Recorder(), Recorder()
    dispatcher = HookDispatcher([first, second])
    events = [line(n) for n in range(500)]
    for event in events:
        dispatcher.emit(event)
    stats = dispatcher.close()
    assert first.got == events
    assert second.got == events
    assert [(s.delivered, s.failed, s.dropped, s.undelivered, s.abandoned) for s in stats] == [
        (500, 0, 0, 0, False)
    ] * 2


def test_events_emitted_from_several_threads_reach_every_hook_in_one_order():
    first, second = Recorder(), Recorder()
    dispatcher = HookDispatcher([first, second])
    go = threading.Event()

    def emitter(base: int) -> None:
        go.wait()
        for n in range(300):
            dispatcher.emit(line(base + n))

    threads = [threading.Thread(target=emitter, args=(1000 * k,)) for k in range(4)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    dispatcher.close()
    assert len(first.got) == 1200
    assert first.got == second.got  # the same order for both
    for k in range(4):  # and each thread's own events in its order
        mine = [
            e.line
            for e in first.got
            if isinstance(e, LogLine) and 1000 * k <= int(e.line.split()[1]) < 1000 * (k + 1)
        ]
        assert mine == [f"line {1000 * k + n}" for n in range(300)]


def test_a_raising_hook_is_logged_and_still_gets_later_events(caplog):
    got: list[str] = []

    def flaky(event: Event) -> None:
        assert isinstance(event, LogLine)
        got.append(event.line)
        raise RuntimeError(f"hook broke on {event.line}")

    after = Recorder()
    dispatcher = HookDispatcher([flaky, after])
    with caplog.at_level(logging.ERROR, logger="executor.hooks"):
        for n in range(10):
            dispatcher.emit(line(n))
        stats = dispatcher.close()
    assert got == [f"line {n}" for n in range(10)]
    assert len(after.got) == 10
    assert (stats[0].delivered, stats[0].failed) == (0, 10)
    assert (stats[1].delivered, stats[1].failed) == (10, 0)
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == MAX_LOGGED_FAILURES  # then only counted
    assert "hook broke on line 0" in caplog.text
    assert "flaky" in tracebacks[0].getMessage()
    assert any("counted, not logged" in r.getMessage() for r in caplog.records)


def test_a_blocked_hook_stalls_neither_emit_nor_others_nor_close(blocker):
    fast = Recorder()
    dispatcher = HookDispatcher([blocker, fast], queue_size=100)
    dispatcher.emit(line(0))
    assert blocker.entered.wait(30)  # it holds event 0 and never returns
    for n in range(1, 31):
        dispatcher.emit(line(n))  # would hang here if emit waited for the hook
    stats = dispatcher.close(timeout_s=0.2)
    slow, quick = stats
    assert (slow.delivered, slow.dropped, slow.undelivered, slow.abandoned) == (0, 0, 30, True)
    assert (quick.delivered, quick.dropped, quick.abandoned) == (31, 0, False)
    assert [e.line for e in fast.got] == [f"line {n}" for n in range(31)]  # type: ignore[attr-defined]
    blocker.release.set()
    assert dispatcher.close() == stats  # closing twice: the same stats, no new wait


def test_an_abandoned_hook_gets_nothing_more_once_it_returns(blocker):
    dispatcher = HookDispatcher([blocker])
    dispatcher.emit(line(0))
    assert blocker.entered.wait(30)
    dispatcher.emit(line(1))
    (stats,) = dispatcher.close(timeout_s=0)
    assert (stats.abandoned, stats.undelivered) == (True, 1)
    blocker.release.set()
    worker_threads = [t for t in threading.enumerate() if t.name.startswith("hook-Blocker")]
    for t in worker_threads:
        t.join(30)
        assert not t.is_alive()
    assert [e.line for e in blocker.got] == ["line 0"]  # type: ignore[attr-defined]


def test_a_full_queue_drops_for_that_hook_only_and_logs_once(blocker, caplog):
    dispatcher = HookDispatcher([blocker], queue_size=3)
    dispatcher.emit(line(0))
    assert blocker.entered.wait(30)
    with caplog.at_level(logging.WARNING, logger="executor.hooks"):
        for n in range(1, 11):
            dispatcher.emit(line(n))
    assert sum("is behind" in r.getMessage() for r in caplog.records) == 1
    blocker.release.set()
    (stats,) = dispatcher.close(timeout_s=30)
    assert (stats.delivered, stats.dropped, stats.undelivered) == (4, 7, 0)
    assert [e.line for e in blocker.got] == ["line 0", "line 1", "line 2", "line 3"]  # type: ignore[attr-defined]


def test_events_after_close_are_dropped_and_counted():
    rec = Recorder()
    dispatcher = HookDispatcher([rec])
    dispatcher.close()
    dispatcher.emit(line(0))
    assert rec.got == []
    assert dispatcher._workers[0].stats().dropped == 1


def test_no_hooks_is_fine():
    with HookDispatcher([]) as dispatcher:
        dispatcher.emit(line(0))
    assert dispatcher.close() == []


# -- events file --------------------------------------------------------------


def test_events_file_writes_one_json_line_per_event(tmp_path):
    path = tmp_path / "events.jsonl"
    events = every_event()
    sink = EventsFile(path)
    dispatcher = HookDispatcher([sink])
    for event in events:
        dispatcher.emit(event)
    (stats,) = dispatcher.close()
    sink.close()
    sink.close()  # twice: fine
    assert stats.delivered == len(events)
    lines = path.read_text().splitlines()
    assert [json.loads(text) for text in lines] == [json.loads(json.dumps(e.to_dict())) for e in events]
    assert "\x1b" not in path.read_text()  # control characters stay escaped inside JSON strings
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_events_file_appends(tmp_path):
    path = tmp_path / "events.jsonl"
    for n in range(2):
        sink = EventsFile(path)
        sink(line(n))
        sink.close()
    assert [json.loads(text)["line"] for text in path.read_text().splitlines()] == ["line 0", "line 1"]


def test_events_file_errors_are_one_line_and_logged_by_the_dispatcher(tmp_path, caplog):
    with pytest.raises(HostError, match="cannot open the events file") as info:
        EventsFile(tmp_path / "missing" / "events.jsonl")
    assert "\n" not in str(info.value)
    sink = EventsFile(tmp_path / "events.jsonl")
    sink.close()
    dispatcher = HookDispatcher([sink])
    with caplog.at_level(logging.ERROR, logger="executor.hooks"):
        dispatcher.emit(line(0))
        (stats,) = dispatcher.close()
    assert stats.failed == 1
    assert "EventsFile" in caplog.text
    assert "is closed" in caplog.text


def test_events_file_write_error_is_raised(tmp_path):
    sink = EventsFile("/dev/full")
    try:
        with pytest.raises(HostError, match="cannot write the events file /dev/full"):
            sink(line(0))
    finally:
        sink.close()
