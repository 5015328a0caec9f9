"""A running sandbox's stdout and stderr, followed from the engine, capped, turned into per-task log lines.

The sandbox's init already caps each stream inside the sandbox
(:data:`executor.sandbox.init.OUTPUT_CAP_BYTES`); the caps here are the
parent's own defence in depth, and bound the parent whatever the engine
hands over: a line is cut at :data:`MAX_LINE_CHARS`, lines beyond a rate
(:attr:`OutputCaps.lines_per_s`, with a burst) are dropped and counted, and
past :attr:`OutputCaps.max_lines` or :attr:`OutputCaps.max_bytes` of a
batch, or :attr:`OutputCaps.task_max_lines` or
:attr:`OutputCaps.task_max_bytes` of the whole task, every later line is
dropped and counted. Memory stays bounded whatever arrives (a 100 MB line
without a newline costs one line's worth).

A task's batches run one container each, one :class:`OutputCollector` per
container; the collectors of one task share a :class:`TaskOutput`: the rate,
the task's totals, and the ledger's log tail (:mod:`executor.data.logtail`), in
which every line carries the mark of its stream.

Each kept line goes to the logger ``executor.task.<task_id>`` (stdout at
INFO, stderr at WARNING unless the line is a log record the protocol wrote at
INFO or DEBUG through the runtime's logging set-up, with ``task_id`` and ``stream`` in the record), to an
``on_line`` callback, and to the task's tail. The parent's own notes about
dropped lines come as lines of the stream :data:`NOTE_STREAM`. Lines are
sandbox text: control characters are kept here and must be escaped wherever
they are printed (so the ``executor.task`` loggers have a ``NullHandler``:
nothing reaches logging's last-resort printer unless the application adds a
handler).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from executor.data import logtail

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)
# Without a handler of the application's, logging's last resort would print
# the sandbox's stderr lines (WARNING) raw to the parent's stderr: hostile text
# on an operator's terminal. An application that wants them adds a handler
# that escapes control characters.
logging.getLogger("executor.task").addHandler(logging.NullHandler())

MAX_LINE_CHARS = 4096
"""Characters of one line kept; the rest is cut and the line ends with :data:`TRUNCATED_MARK`."""
MAX_TAIL_CHARS = logtail.MAX_CHARS
"""Characters of the last lines kept for the ledger's log tail."""
TRUNCATED_MARK = " [line truncated]"
NOTE_STREAM = logtail.NOTE_STREAM
"""The stream name of the parent's own notes (output dropped by a cap)."""
# One line's bytes held while it is incomplete: enough for MAX_LINE_CHARS of
# any UTF-8 text (at most 4 bytes a character).
_MAX_LINE_BYTES = MAX_LINE_CHARS * 4
_LEVELS = {"stdout": logging.INFO, "stderr": logging.WARNING, NOTE_STREAM: logging.WARNING}
# A stderr line the runtime's logging set-up wrote ("INFO name: message", see
# executor.sandbox.runtime.LOG_FORMAT) keeps its level; the level is all the
# sandbox can choose, never above WARNING, so it cannot fake an error.
_RECORD_LEVELS = {"DEBUG": logging.DEBUG, "INFO": logging.INFO}


def line_level(stream: str, text: str) -> int:
    """The level a sandbox's output line is logged at in the parent."""
    if stream == "stderr":
        level = _RECORD_LEVELS.get(text.partition(" ")[0])
        if level is not None:
            return level
    return _LEVELS.get(stream, logging.INFO)


# Failures of on_line logged with a traceback; later ones are only counted.
_MAX_LOGGED_CALLBACK_FAILURES = 3


@dataclass(frozen=True)
class OutputCaps:
    """How much of a task's output the parent passes on.

    Attributes:
        lines_per_s: Sustained lines a second (a token bucket), per task:
            its batches share it.
        burst: Lines passed at once before the rate applies.
        max_lines: Lines passed on per batch (container).
        max_bytes: Bytes of lines passed on per batch (as the sandbox wrote
            them, after truncation).
        task_max_lines: Lines passed on per task, all its batches together.
        task_max_bytes: Bytes of lines passed on per task.
    """

    lines_per_s: float = 200.0
    burst: int = 2000
    max_lines: int = 20_000
    max_bytes: int = 4 * 1024 * 1024
    task_max_lines: int = 100_000
    task_max_bytes: int = 16 * 1024 * 1024

    def __post_init__(self) -> None:
        counts = (self.burst, self.max_lines, self.max_bytes, self.task_max_lines, self.task_max_bytes)
        if self.lines_per_s <= 0 or min(counts) < 1:
            raise ValueError(f"output caps must be positive: {self}")


@dataclass(frozen=True)
class OutputStats:
    """What the collector did with the output.

    Attributes:
        lines: Lines of the sandbox passed on (notes not counted).
        bytes: Their bytes, as the sandbox wrote them (after truncation).
        truncated: Lines cut at :data:`MAX_LINE_CHARS`.
        dropped_rate: Lines dropped over the rate.
        dropped_cap: Lines dropped over the total caps (the batch's or the task's).
    """

    lines: int = 0
    bytes: int = 0
    truncated: int = 0
    dropped_rate: int = 0
    dropped_cap: int = 0


class TaskOutput:
    """What one task's output collectors share: the rate, the task's totals and its log tail.

    A task's batches run one after another, each with a collector of its
    own; they all take this object's lock, so its state and theirs change
    under one lock.

    Args:
        caps: The caps; the rate and the ``task_*`` totals are this task's.
        batched: Whether the tail separates batches (``--- batch N ---``).
        clock: Seconds, monotonic; the rate's clock (tests inject one).
    """

    def __init__(
        self,
        caps: OutputCaps | None = None,
        *,
        batched: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.caps = caps or OutputCaps()
        self.clock = clock
        self.lock = threading.Lock()
        self.tokens = float(self.caps.burst)
        self.refilled_at: float | None = None
        self.lines = 0
        self.bytes = 0
        self.capped = False
        self._tail = logtail.Tail(batched=batched)

    def refill(self) -> None:
        """Add the tokens the time since the last refill earned (lock held)."""
        now = self.clock()
        if self.refilled_at is not None and now > self.refilled_at:
            self.tokens = min(
                float(self.caps.burst), self.tokens + (now - self.refilled_at) * self.caps.lines_per_s
            )
        if self.refilled_at is None or now > self.refilled_at:
            self.refilled_at = now

    def over_total(self, raw: bytes) -> bool:
        """Whether one more line of ``raw`` would pass the task's totals (lock held)."""
        caps = self.caps
        return self.lines + 1 > caps.task_max_lines or self.bytes + len(raw) > caps.task_max_bytes

    def keep(self, batch: int, stream: str, text: str) -> None:
        """Add a passed line to the tail (lock held)."""
        self._tail.add(batch, stream, text)

    def tail(self) -> str:
        """The ledger's log tail so far: the last lines, each marked (:mod:`executor.data.logtail`)."""
        with self.lock:
            return self._tail.text()


class OutputSource(Protocol):
    """Where the output comes from: any :class:`~executor.backends.ContainerBackend`."""

    def follow_output(self, container_id: str) -> Iterator[tuple[str, bytes]]:
        """``(stream, chunk)`` pairs until the container stops."""
        ...


class _Stream:
    """One stream's incomplete line."""

    __slots__ = ("buf", "discarding")

    def __init__(self) -> None:
        self.buf = bytearray()
        # The current line was already cut and passed on (or dropped): skip to its newline.
        self.discarding = False


class OutputCollector:
    """Follows one container's stdout and stderr on a daemon thread, under the caps.

    Args:
        source: The backend whose ``follow_output`` yields the container's output.
        task_id: The task, for the logger's name and each record's ``task_id``.
        on_line: Called with ``(stream, line)`` for every line passed on
            (including notes); an exception from it is logged, never raised.
        caps: The rate and total caps (when no ``task`` is given).
        clock: Seconds, monotonic; the rate's clock (when no ``task`` is given).
        task: What the task's collectors share (its rate, totals and tail);
            by default one of this collector's own.
        batch: The batch (1-based) this container runs, for the tail.
    """

    def __init__(
        self,
        source: OutputSource,
        task_id: str,
        *,
        on_line: Callable[[str, str], object] | None = None,
        caps: OutputCaps | None = None,
        clock: Callable[[], float] = time.monotonic,
        task: TaskOutput | None = None,
        batch: int = 1,
    ) -> None:
        if task is not None and caps is not None:
            raise ValueError("give the caps to the TaskOutput, not to each of its collectors")
        self._source = source
        self.task_id = task_id
        self._on_line = on_line
        self._task = task if task is not None else TaskOutput(caps, clock=clock)
        self.caps = self._task.caps
        self._batch = batch
        self.logger = logging.getLogger(f"executor.task.{task_id}")
        self._lock = self._task.lock
        self._streams: dict[str, _Stream] = {}
        self._lines = 0
        self._bytes = 0
        self._truncated = 0
        self._dropped_rate = 0
        self._dropped_cap = 0
        self._pending_rate = 0  # dropped over the rate since the last note
        self._capped = False
        self._callback_failures = 0
        self._finished = False
        self._thread: threading.Thread | None = None

    # -- life ----------------------------------------------------------------
    def start(self, container_id: str) -> None:
        """Follow ``container_id`` (started) on a daemon thread until its output ends."""
        if self._thread is not None:
            raise RuntimeError("this collector already follows a container")
        # Asked here, not on the thread: the engine hears of the follow in the caller's order.
        chunks = self._source.follow_output(container_id)
        self._thread = threading.Thread(
            target=self._follow, args=(chunks,), name=f"output-{self.task_id}"[:60], daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> OutputStats:
        """Wait up to ``timeout_s`` for the output to end, then stop following.

        Whatever was still incomplete is passed on and the notes of dropped
        lines are written. If the engine's stream is still open then, the
        following thread (a daemon) is left to end with it and passes nothing
        more on. Safe to call twice, and when :meth:`start` never was.
        """
        if self._thread is not None:
            self._thread.join(max(0.0, timeout_s))
            if self._thread.is_alive():
                log.debug(
                    "task %s: its output did not end within %.1f s; no longer followed",
                    self.task_id,
                    timeout_s,
                )
        self._finish()
        return self.stats

    def tail(self) -> str:
        """The task's log tail so far (:meth:`TaskOutput.tail`); this collector's own, if it has one."""
        return self._task.tail()

    @property
    def stats(self) -> OutputStats:
        """The counts so far."""
        with self._lock:
            return OutputStats(
                lines=self._lines,
                bytes=self._bytes,
                truncated=self._truncated,
                dropped_rate=self._dropped_rate,
                dropped_cap=self._dropped_cap,
            )

    def _follow(self, chunks: Iterator[tuple[str, bytes]]) -> None:
        try:
            for stream, chunk in chunks:
                if self._finished:  # stop() gave up waiting: let the engine's stream go
                    close = getattr(chunks, "close", None)
                    if close is not None:
                        close()
                    return
                self.feed(stream, chunk)
        except Exception:  # the engine's problem; the task must not fail for its log
            log.warning("task %s: following its output failed", self.task_id, exc_info=True)
        self._finish()

    # -- lines ---------------------------------------------------------------
    def feed(self, stream: str, chunk: bytes) -> None:
        """Take one chunk of ``stream`` (what the following thread does; public for tests)."""
        with self._lock:
            if self._finished:
                return
            self._task.refill()
            st = self._streams.setdefault(stream, _Stream())
            pos, end = 0, len(chunk)
            while pos < end:
                if self._capped or self._task.tokens < 1:
                    # Nothing more passes in this chunk: count its lines without splitting them.
                    pos = self._skip(st, chunk, pos)
                    continue
                nl = chunk.find(b"\n", pos)
                stop = end if nl < 0 else nl
                if st.discarding:
                    if nl < 0:
                        return
                    st.discarding = False
                else:
                    room = _MAX_LINE_BYTES - len(st.buf)
                    if stop - pos > room:
                        # Too long: pass the line on cut now, skip the rest of it.
                        st.buf += chunk[pos : pos + room]
                        self._line(stream, bytes(st.buf), cut=True)
                        st.buf.clear()
                        st.discarding = True
                        pos += room
                        continue
                    st.buf += chunk[pos:stop]
                    if nl < 0:
                        return
                    self._line(stream, bytes(st.buf), cut=False)
                    st.buf.clear()
                pos = nl + 1

    def _skip(self, st: _Stream, chunk: bytes, pos: int) -> int:
        """Drop every line ending in ``chunk[pos:]`` at once, keep its incomplete end; ``len(chunk)``."""
        end = len(chunk)
        newlines = chunk.count(b"\n", pos)
        if newlines:
            # The first newline ends a line already decided (cut and passed on) when discarding.
            self._drop(newlines - (1 if st.discarding else 0))
            st.buf.clear()
            st.discarding = False
            pos = chunk.rfind(b"\n") + 1
        if not st.discarding:
            room = _MAX_LINE_BYTES - len(st.buf)
            if end - pos > room:
                self._drop(1)  # a line too long, decided now: dropped like the rest
                st.buf.clear()
                st.discarding = True
            else:
                st.buf += chunk[pos:end]
        return end

    def _drop(self, n: int) -> None:
        if n <= 0:
            return
        if self._capped:
            self._dropped_cap += n
        else:
            self._dropped_rate += n
            self._pending_rate += n

    def _line(self, stream: str, raw: bytes, *, cut: bool) -> None:
        """Decide on one whole (or cut) line: pass it on, or drop it over a cap."""
        if self._capped:
            self._drop(1)
            return
        task = self._task
        if self._lines + 1 > self.caps.max_lines or self._bytes + len(raw) > self.caps.max_bytes:
            self._capped = True
            self._drop(1)
            self._note_rate()
            self._pass(
                NOTE_STREAM,
                f"[executor: output cap reached ({self.caps.max_lines} lines or {self.caps.max_bytes} "
                "bytes); later lines are dropped]",
            )
            return
        if task.capped or task.over_total(raw):
            # The task's total: this batch drops the rest, and so does every later batch.
            self._capped = True
            self._drop(1)
            if not task.capped:
                task.capped = True
                self._note_rate()
                self._pass(
                    NOTE_STREAM,
                    f"[executor: the task's output total reached ({self.caps.task_max_lines} lines or "
                    f"{self.caps.task_max_bytes} bytes across its batches); later lines are dropped]",
                )
            return
        if task.tokens < 1:
            self._drop(1)
            return
        task.tokens -= 1
        self._note_rate()
        text = raw.decode("utf-8", "replace")
        if text.endswith("\r") and not cut:
            text = text[:-1]
        if len(text) > MAX_LINE_CHARS:
            text, cut = text[:MAX_LINE_CHARS], True
        if cut:
            self._truncated += 1
            text += TRUNCATED_MARK
        self._lines += 1
        self._bytes += len(raw)
        task.lines += 1
        task.bytes += len(raw)
        self._pass(stream, text)

    def _note_rate(self) -> None:
        if self._pending_rate:
            n, self._pending_rate = self._pending_rate, 0
            self._pass(NOTE_STREAM, f"[executor: {n} lines dropped: over {self.caps.lines_per_s:g} lines/s]")

    def _pass(self, stream: str, text: str) -> None:
        """Log ``text``, keep it in the tail, hand it to ``on_line``."""
        self.logger.log(
            line_level(stream, text), "%s", text, extra={"task_id": self.task_id, "stream": stream}
        )
        self._task.keep(self._batch, stream, text)
        if self._on_line is not None:
            try:
                self._on_line(stream, text)
            except Exception:
                self._callback_failures += 1
                if self._callback_failures <= _MAX_LOGGED_CALLBACK_FAILURES:
                    log.exception("task %s: the output line listener failed", self.task_id)

    def _finish(self) -> None:
        """Pass on the incomplete lines and the closing notes, once."""
        with self._lock:
            if self._finished:
                return
            for stream, st in self._streams.items():
                if st.buf and not st.discarding:
                    self._task.refill()
                    self._line(stream, bytes(st.buf), cut=False)
                st.buf.clear()
            self._note_rate()
            if self._dropped_cap:
                self._pass(NOTE_STREAM, f"[executor: {self._dropped_cap} lines dropped over the output cap]")
            self._finished = True
