"""Following a sandbox's output: lines, caps, the tail, the per-task logger, and the follows that feed it."""

from __future__ import annotations

import logging
import threading
import tracemalloc
from typing import TYPE_CHECKING

import docker.errors
import pytest

from executor import testing
from executor.backends import ContainerSpec
from executor.backends.docker import DockerBackend
from executor.data import logtail
from executor.policy import IsolationPolicy
from executor.task.output import (
    MAX_LINE_CHARS,
    MAX_TAIL_CHARS,
    NOTE_STREAM,
    TRUNCATED_MARK,
    OutputCaps,
    OutputCollector,
    TaskOutput,
)
from executor.testing.engine import prints

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

MiB = 1024 * 1024
OPEN = OutputCaps(lines_per_s=1e9, burst=10**9, max_lines=10**9, max_bytes=10**12)


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Source:
    """A backend whose ``follow_output`` yields what the test gives it."""

    def __init__(self, chunks: Iterable[tuple[str, bytes]]) -> None:
        self.chunks = chunks
        self.followed: list[str] = []

    def follow_output(self, container_id: str) -> Iterator[tuple[str, bytes]]:
        self.followed.append(container_id)
        return iter(self.chunks)


def collector(caps: OutputCaps = OPEN, clock: Clock | None = None, chunks=()) -> tuple[OutputCollector, list]:
    lines: list[tuple[str, str]] = []
    c = OutputCollector(
        Source(chunks), "t-1", on_line=lambda s, t: lines.append((s, t)), caps=caps, clock=clock or Clock()
    )
    return c, lines


def lines_of(n: int, start: int = 0) -> bytes:
    return b"".join(b"line %d\n" % i for i in range(start, start + n))


# -- lines --------------------------------------------------------------------


def test_lines_are_split_across_chunks_per_stream():
    c, lines = collector()
    c.feed("stdout", b"hel")
    c.feed("stderr", b"err")
    c.feed("stdout", b"lo\nwor")
    c.feed("stderr", b"or 1\r\nerror 2\n\n")
    c.feed("stdout", b"ld\nno newline at the end")
    c.stop()
    assert lines == [
        ("stdout", "hello"),
        ("stderr", "error 1"),  # CRLF ends a line like LF
        ("stderr", "error 2"),
        ("stderr", ""),
        ("stdout", "world"),
        ("stdout", "no newline at the end"),  # passed on when the output ends
    ]
    assert c.stats.lines == 6


def test_bad_utf8_is_replaced_and_control_characters_are_kept():
    c, lines = collector()
    c.feed("stdout", b"caf\xc3")  # a character cut between chunks
    c.feed("stdout", b"\xa9 \xff\x1b[2J\x07\n")
    c.stop()
    assert lines == [("stdout", "café \ufffd\x1b[2J\x07")]


def test_a_long_line_is_cut_with_a_mark_and_the_next_line_is_whole():
    c, lines = collector()
    c.feed("stdout", b"x" * 10_000 + b"\nnext\n")
    for _ in range(5):  # a long line over several chunks
        c.feed("stderr", b"y" * 7_000)
    c.feed("stderr", b"\nafter\n")
    c.stop()
    assert lines == [
        ("stdout", "x" * MAX_LINE_CHARS + TRUNCATED_MARK),
        ("stdout", "next"),
        ("stderr", "y" * MAX_LINE_CHARS + TRUNCATED_MARK),
        ("stderr", "after"),
    ]
    assert (c.stats.lines, c.stats.truncated) == (4, 2)


def test_a_long_line_of_wide_characters_is_cut_at_the_character_cap():
    c, lines = collector()
    c.feed("stdout", "é".encode() * 5000 + b"\n")
    c.stop()
    assert lines == [("stdout", "é" * MAX_LINE_CHARS + TRUNCATED_MARK)]


def test_kept_lines_go_to_the_task_logger_tagged(caplog):
    c, _ = collector()
    with caplog.at_level(logging.INFO, logger="executor.task"):
        c.feed("stdout", b"to stdout\n")
        c.feed("stderr", b"to stderr\n")
        c.stop()
    records = [r for r in caplog.records if r.name == "executor.task.t-1"]
    assert [(r.getMessage(), r.levelno, r.task_id, r.stream) for r in records] == [  # type: ignore[attr-defined]
        ("to stdout", logging.INFO, "t-1", "stdout"),
        ("to stderr", logging.WARNING, "t-1", "stderr"),
    ]


def test_the_task_loggers_never_print_through_logging_s_last_resort(monkeypatch):
    # Sandbox text on an operator's terminal unescaped would be an injection;
    # only a handler the application adds may print it.
    class Recording(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    last_resort = Recording()
    monkeypatch.setattr(logging, "lastResort", last_resort)
    monkeypatch.setattr(logging.root, "handlers", [])  # an application that configured nothing
    c, _ = collector()
    c.feed("stderr", b"\x1b]0;owned\x07\n")
    c.stop()
    assert last_resort.records == []


def test_a_failing_line_listener_is_logged_and_lines_keep_coming(caplog):
    seen: list[str] = []

    def listener(stream: str, line: str) -> None:
        seen.append(line)
        raise RuntimeError("listener broke")

    c = OutputCollector(Source([]), "t-1", on_line=listener, caps=OPEN, clock=Clock())
    with caplog.at_level(logging.ERROR, logger="executor.task.output"):
        c.feed("stdout", lines_of(10))
        c.stop()
    assert seen == [f"line {i}" for i in range(10)]
    assert sum(r.exc_info is not None for r in caplog.records) == 3


# -- rate cap -----------------------------------------------------------------


def test_lines_over_the_rate_are_dropped_counted_and_noted():
    clock = Clock()
    c, lines = collector(OutputCaps(lines_per_s=10, burst=5), clock)
    for i in range(20):  # one line a chunk, all at t=0
        c.feed("stdout", b"line %d\n" % i)
    assert [t for _, t in lines] == [f"line {i}" for i in range(5)]
    assert c.stats.dropped_rate == 15
    clock.now = 0.35  # 3.5 lines' worth
    c.feed("stderr", lines_of(5, start=100))
    assert lines[5:] == [
        (NOTE_STREAM, "[executor: 15 lines dropped: over 10 lines/s]"),
        ("stderr", "line 100"),
        ("stderr", "line 101"),
        ("stderr", "line 102"),
    ]
    clock.now = 100.0  # the bucket refills to its burst, no more
    c.feed("stdout", lines_of(8, start=200))
    assert lines[9] == (NOTE_STREAM, "[executor: 2 lines dropped: over 10 lines/s]")
    assert [t for _, t in lines[10:15]] == [f"line {i}" for i in range(200, 205)]
    stats = c.stop()
    assert lines[-1] == (NOTE_STREAM, "[executor: 3 lines dropped: over 10 lines/s]")  # the end's note
    assert (stats.lines, stats.dropped_rate, stats.dropped_cap) == (13, 20, 0)


def test_a_chunk_of_many_lines_is_rate_capped_exactly():
    c, lines = collector(OutputCaps(lines_per_s=1, burst=7))
    c.feed("stdout", b"partial ")
    c.feed("stdout", b"start\n" + lines_of(100) + b"unfinished")
    c.feed("stdout", b" still\n")
    stats = c.stop()
    assert [t for _, t in lines[:7]] == ["partial start"] + [f"line {i}" for i in range(6)]
    assert stats.dropped_rate == 101 - 7 + 1  # and the line ended in the next chunk
    assert lines[7:] == [(NOTE_STREAM, "[executor: 95 lines dropped: over 1 lines/s]")]


def test_a_long_line_arriving_over_the_rate_counts_once():
    c, lines = collector(OutputCaps(lines_per_s=1, burst=1))
    c.feed("stdout", b"kept\n" + b"z" * 100_000)
    c.feed("stdout", b"z" * 100_000 + b"\nalso dropped\n")
    stats = c.stop()
    assert stats.dropped_rate == 2
    assert [t for _, t in lines] == ["kept", "[executor: 2 lines dropped: over 1 lines/s]"]


# -- total caps ---------------------------------------------------------------


def test_lines_over_the_total_line_cap_are_dropped_and_noted():
    c, lines = collector(OutputCaps(max_lines=10))
    c.feed("stdout", lines_of(25))
    c.feed("stderr", b"late\n")
    stats = c.stop()
    assert [t for _, t in lines[:10]] == [f"line {i}" for i in range(10)]
    assert lines[10:] == [
        (NOTE_STREAM, "[executor: output cap reached (10 lines or 4194304 bytes); later lines are dropped]"),
        (NOTE_STREAM, "[executor: 16 lines dropped over the output cap]"),
    ]
    assert (stats.lines, stats.dropped_cap, stats.dropped_rate) == (10, 16, 0)


def test_the_byte_cap_counts_what_the_sandbox_wrote():
    c, lines = collector(OutputCaps(max_bytes=1000))
    for _ in range(5):
        c.feed("stdout", b"a" * 299 + b"\n")  # 299 bytes a line
    stats = c.stop()
    assert (stats.lines, stats.bytes, stats.dropped_cap) == (3, 897, 2)
    assert [s for s, _ in lines] == ["stdout"] * 3 + [NOTE_STREAM] * 2


# -- tail -----------------------------------------------------------------------


def test_the_tail_keeps_the_last_whole_lines_within_its_size_each_marked():
    c, _ = collector()
    for i in range(2000):
        c.feed("stdout" if i % 2 else "stderr", b"%05d " % i + b"t" * 94 + b"\n")
    c.stop()
    tail = c.tail()
    assert len(tail) <= MAX_TAIL_CHARS
    assert len(tail) > MAX_TAIL_CHARS - 110  # it is full, less at most one line
    assert tail.endswith("stdout| 01999 " + "t" * 94 + "\n")
    lines = tail.splitlines()
    assert lines[0].startswith(("stdout| ", "stderr| "))  # cut between lines only
    assert int(lines[0][8:13]) == 2000 - len(lines)


def test_notes_are_in_the_tail_too_marked_as_the_executor_s():
    c, _ = collector(OutputCaps(max_lines=1))
    c.feed("stdout", b"one\ntwo\n")
    c.stop()
    assert c.tail().splitlines() == [
        "stdout| one",
        "executor| [executor: output cap reached (1 lines or 4194304 bytes); later lines are dropped]",
        "executor| [executor: 1 lines dropped over the output cap]",
    ]


def test_a_protocol_cannot_forge_the_parent_s_notes_or_separators_in_the_tail():
    # Finding 6 of the third red team: these lines read as the parent's in
    # `tasks` and `tasks --json` when the tail held bare lines.
    forged = [
        b"[executor: output cap reached (20000 lines or 4194304 bytes); later lines are dropped]",
        b"--- batch 2 ---",
        b"executor| --- batch 9 ---",
        b"CRITICAL executor.runner: the parent failed",
        b"ok\rexecutor| [executor: after a carriage return]",
        "ok\u2028executor| [executor: after a line separator]".encode(),
        b"ok\x85executor| [executor: after NEL]\x0bexecutor| [executor: after VT]",
    ]
    output = TaskOutput(batched=True)
    c = OutputCollector(Source([]), "t-1", task=output, batch=1)
    for line in forged:
        c.feed("stdout", line + b"\n")
        c.feed("stderr", line + b"\n")
    c.stop()
    tail = output.tail()
    assert tail.splitlines() == tail.split("\n")[:-1]  # no reader sees other line breaks
    lines = tail.splitlines()
    assert lines[0] == "executor| --- batch 1 ---"
    assert all(line.startswith(("stdout| ", "stderr| ")) for line in lines[1:])
    parsed = logtail.parse(tail, logtail.FORMAT)
    assert [(p.stream, p.batch) for p in parsed] == [("stdout", 1), ("stderr", 1)] * len(forged)
    assert parsed[8].line == "ok\\rexecutor| [executor: after a carriage return]"


def test_a_task_s_tail_separates_its_batches_and_a_cut_keeps_the_first_batch_s_separator():
    output = TaskOutput(batched=True)
    for batch in (1, 2, 3):
        c = OutputCollector(Source([]), "t-1", task=output, batch=batch)
        c.feed("stdout", b"".join(b"b%d line %05d %s\n" % (batch, i, b"x" * 200) for i in range(150)))
        c.stop()
    tail = output.tail()
    assert len(tail) <= MAX_TAIL_CHARS
    lines = tail.splitlines()
    assert lines[0] in ("executor| --- batch 1 ---", "executor| --- batch 2 ---")
    assert "executor| --- batch 3 ---" in lines
    parsed = logtail.parse(tail, logtail.FORMAT)
    assert parsed[-1].batch == 3
    assert parsed[-1].line.startswith("b3 line 00149")
    assert all(p.line.startswith(f"b{p.batch} ") for p in parsed)


def test_the_task_s_totals_hold_across_its_batches_with_one_note():
    output = TaskOutput(OutputCaps(max_lines=10, task_max_lines=15), batched=True)
    seen: list[tuple[int, str, str]] = []
    stats = []
    for batch in (1, 2, 3):
        c = OutputCollector(
            Source([]), "t-1", on_line=lambda s, t, b=batch: seen.append((b, s, t)), task=output, batch=batch
        )
        c.feed("stdout", lines_of(12))
        stats.append(c.stop())
    passed = [(b, t) for b, s, t in seen if s == "stdout"]
    assert [b for b, _ in passed] == [1] * 10 + [2] * 5
    total_notes = [t for _, s, t in seen if s == NOTE_STREAM and "task's output total" in t]
    assert total_notes == [
        "[executor: the task's output total reached (15 lines or 16777216 bytes across its batches); "
        "later lines are dropped]"
    ]
    assert [(st.lines, st.dropped_cap) for st in stats] == [(10, 2), (5, 7), (0, 12)]
    assert (output.lines, output.bytes) == (15, 15 * len(b"line 0"))


def test_the_rate_is_the_task_s_so_a_new_batch_gets_no_fresh_burst():
    clock = Clock()
    output = TaskOutput(OutputCaps(lines_per_s=10, burst=5), clock=clock)
    lines: list[str] = []
    for batch in (1, 2):
        c = OutputCollector(Source([]), "t-1", on_line=lambda s, t: lines.append(t), task=output, batch=batch)
        c.feed("stdout", lines_of(5, start=batch * 100))
        c.stop()
    assert [t for t in lines if t.startswith("line")] == [f"line {i}" for i in range(100, 105)]


def test_caps_go_to_the_task_output_not_to_each_collector():
    with pytest.raises(ValueError, match="TaskOutput"):
        OutputCollector(Source([]), "t-1", caps=OutputCaps(), task=TaskOutput())


# -- floods ---------------------------------------------------------------------


def _peak_bytes_while(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_100_mb_line_without_newline_costs_one_line():
    block = b"x" * (64 * 1024)  # the same object every time: the flood itself costs nothing

    def flood() -> Iterator[tuple[str, bytes]]:
        for _ in range(1600):  # 100 MiB
            yield ("stdout", block)

    c, lines = collector(OutputCaps(), chunks=flood())
    peak = _peak_bytes_while(lambda: (c.start("cid"), c.stop(timeout_s=120)))
    assert lines == [("stdout", "x" * MAX_LINE_CHARS + TRUNCATED_MARK)]
    assert peak < 2 * MiB, peak


def test_a_100_mb_flood_of_lines_is_capped_and_bounded():
    block = b"line\n" * 13107  # 65535 bytes

    def flood() -> Iterator[tuple[str, bytes]]:
        for _ in range(1600):
            yield ("stderr", block)

    c, lines = collector(OutputCaps(), chunks=flood())  # the clock stands still: the burst, then nothing
    peak = _peak_bytes_while(lambda: (c.start("cid"), c.stop(timeout_s=120)))
    stats = c.stats
    assert (stats.lines, stats.dropped_rate) == (2000, 1600 * 13107 - 2000)
    assert lines[-1] == (NOTE_STREAM, f"[executor: {1600 * 13107 - 2000} lines dropped: over 200 lines/s]")
    assert len(c.tail()) <= MAX_TAIL_CHARS
    assert peak < 4 * MiB, peak


# -- the thread -----------------------------------------------------------------


def test_start_follows_the_container_on_a_thread_until_its_output_ends():
    source = Source([("stdout", b"a\nb"), ("stderr", b"c\n"), ("stdout", b"\n")])
    lines: list[tuple[str, str]] = []
    c = OutputCollector(source, "t-1", on_line=lambda s, t: lines.append((s, t)))
    c.start("cid-1")
    c.stop(timeout_s=30)
    assert source.followed == ["cid-1"]
    assert lines == [("stdout", "a"), ("stderr", "c"), ("stdout", "b")]
    with pytest.raises(RuntimeError):
        c.start("cid-1")


def test_stop_without_start_is_fine():
    c, lines = collector()
    assert c.stop().lines == 0
    assert (lines, c.tail()) == ([], "")


def test_stop_returns_when_the_engine_stream_blocks_and_later_output_is_ignored():
    release = threading.Event()
    gone = threading.Event()

    def stuck() -> Iterator[tuple[str, bytes]]:
        try:
            yield ("stdout", b"before\npartial")
            release.wait()
            yield ("stdout", b"after\n")
            yield ("stdout", b"more\n")
        finally:
            gone.set()

    c, lines = collector(chunks=stuck())
    c.start("cid")
    try:
        c.stop(timeout_s=0.05)  # would hang here if stop waited for the stream
        assert lines == [("stdout", "before"), ("stdout", "partial")]
    finally:
        release.set()
    assert gone.wait(30)  # the collector let the stream go
    assert lines == [("stdout", "before"), ("stdout", "partial")]


def test_a_failing_stream_ends_the_following_quietly(caplog):
    def broken() -> Iterator[tuple[str, bytes]]:
        yield ("stdout", b"one\n")
        raise ConnectionResetError("engine went away")

    c, lines = collector(chunks=broken())
    with caplog.at_level(logging.WARNING, logger="executor.task.output"):
        c.start("cid")
        c.stop(timeout_s=30)
    assert lines == [("stdout", "one")]
    assert "following its output failed" in caplog.text


# -- the fake engine's follow -----------------------------------------------------


def _fake_spec() -> ContainerSpec:
    return ContainerSpec(
        name="t", command=["true"], policy=IsolationPolicy.hardened().replace(uid=10_001), mounts=[]
    )


def test_the_fake_engine_yields_what_its_program_writes():
    backend = testing.FakeBackend(
        program=prints(("stdout", "out 1\n"), ("stderr", b"err 1\n"), ("stdout", "out 2\n"))
    )
    cid = backend.create(_fake_spec())
    backend.start(cid)
    lines: list[tuple[str, str]] = []
    c = OutputCollector(backend, "t-1", on_line=lambda s, t: lines.append((s, t)))
    c.start(cid)
    c.stop(timeout_s=30)
    assert lines == [("stdout", "out 1"), ("stderr", "err 1"), ("stdout", "out 2")]
    assert backend.stderr_tail(cid, 1) == "err 1\n"
    assert backend.ops(cid) == ["start", "follow_output"]
    backend.remove(cid)


def test_the_fake_engine_follow_ends_when_the_container_is_removed():
    backend = testing.FakeBackend()  # hangs until killed
    cid = backend.create(_fake_spec())
    backend.start(cid)
    backend.only().write("stdout", "hello\n")
    got: list[tuple[str, bytes]] = []
    follower = threading.Thread(target=lambda: got.extend(backend.follow_output(cid)), daemon=True)
    follower.start()
    backend.remove(cid)
    follower.join(30)
    assert not follower.is_alive()
    assert got == [("stdout", b"hello\n")]


# -- the Docker backend's follow, without an engine ---------------------------------


class StubStream:
    """A docker-py log stream: frames, then blocks until closed when ``hold``."""

    def __init__(self, frames: list[bytes], hold: bool = False) -> None:
        self.frames = frames
        self.hold = hold
        self.closed = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        yield from self.frames
        if self.hold:
            self.closed.wait()

    def close(self) -> None:
        self.closed.set()


class StubAPI:
    """docker-py's low-level ``logs``: per stream, the follow's frames then the catch-up read's."""

    def __init__(self, **streams: StubStream | Exception | tuple[StubStream, StubStream]) -> None:
        self.streams = streams
        self.calls: list[dict[str, object]] = []

    def logs(self, container_id: str, *, stdout: bool, stderr: bool, **kwargs: object) -> StubStream:
        assert kwargs["stream"]
        assert kwargs["timestamps"]
        assert stdout != stderr
        self.calls.append({"stdout": stdout, **kwargs})
        got = self.streams["stdout" if stdout else "stderr"]
        if isinstance(got, Exception):
            raise got
        if isinstance(got, tuple):
            return got[0] if kwargs["follow"] else got[1]
        return got if kwargs["follow"] else StubStream([])


class StubClient:
    def __init__(self, api: StubAPI) -> None:
        self.api = api


def stamped(second: int, nanos: int, message: bytes) -> bytes:
    return b"2024-05-01T12:30:%02d.%09dZ " % (second, nanos) + message


def test_docker_follow_tags_each_stream_and_keeps_each_one_s_order():
    api = StubAPI(
        stdout=StubStream([stamped(0, 1, b"o1\n"), stamped(0, 2, b"o2\n"), stamped(1, 0, b"o3\n")]),
        stderr=StubStream([stamped(0, 5, b"e1\n"), b"unstamped e2\n"]),
    )
    got = list(DockerBackend(StubClient(api)).follow_output("cid"))  # type: ignore[arg-type]
    assert [c for s, c in got if s == "stdout"] == [b"o1\n", b"o2\n", b"o3\n"]
    assert [c for s, c in got if s == "stderr"] == [b"e1\n", b"unstamped e2\n"]


def test_docker_follow_reads_on_after_the_engine_lets_the_follow_go():
    # Docker 20.10 may end a follow before the exit's last unterminated line
    # is in the log; the catch-up read from the last time stamp seen picks it
    # up, and nothing the follow gave comes twice (two messages share a stamp).
    follow = StubStream([stamped(0, 1, b"a\n"), stamped(3, 7, b"b\n"), stamped(3, 7, b"c\n")])
    catch_up = StubStream(
        [
            stamped(2, 9, b"a\n"),
            stamped(3, 7, b"b\n"),
            stamped(3, 7, b"c\n"),
            stamped(3, 7, b"d\n"),
            stamped(4, 0, b"last words"),
        ]
    )
    api = StubAPI(stdout=(follow, catch_up), stderr=StubStream([]))
    got = list(DockerBackend(StubClient(api)).follow_output("cid"))  # type: ignore[arg-type]
    assert b"".join(c for s, c in got if s == "stdout") == b"a\nb\nc\nd\nlast words"
    since = [c.get("since") for c in api.calls if c["stdout"] and not c["follow"]]
    assert since == [pytest.approx(1714566603.000000007 - 1.0)]


def test_docker_follow_of_a_removed_container_ends_quietly():
    gone = docker.errors.NotFound("No such container: cid")
    api = StubAPI(stdout=gone, stderr=StubStream([b"last words\n"]))
    assert list(DockerBackend(StubClient(api)).follow_output("cid")) == [("stderr", b"last words\n")]  # type: ignore[arg-type]


def test_closing_the_docker_follow_closes_both_engine_streams():
    out, err = StubStream([b"o\n"], hold=True), StubStream([], hold=True)
    chunks = DockerBackend(StubClient(StubAPI(stdout=out, stderr=err))).follow_output("cid")  # type: ignore[arg-type]
    assert next(chunks) == ("stdout", b"o\n")
    chunks.close()  # type: ignore[attr-defined]
    assert out.closed.is_set()
    assert err.closed.wait(30)  # closed here, or by its follow thread if it opened after


def test_a_protocols_info_and_debug_records_keep_their_level_and_nothing_rises_above_warning():
    import logging

    from executor.task.output import line_level

    assert line_level("stderr", "INFO csv_stats: 3 files") == logging.INFO
    assert line_level("stderr", "DEBUG x: y") == logging.DEBUG
    assert line_level("stderr", "Traceback (most recent call last):") == logging.WARNING
    assert line_level("stderr", "ERROR x: y") == logging.WARNING
    assert line_level("stderr", "CRITICAL x: y") == logging.WARNING
    assert line_level("stdout", "INFO not a record") == logging.INFO
    assert line_level("stdout", "ERROR printed") == logging.INFO
