r"""The ledger's log tail: a task's last lines of output, each marked with the stream it came from.

In format 1 (:data:`FORMAT`) every line of the tail is one line of output,
marked::

    stdout| a line the protocol printed
    stderr| WARNING csv_stats: a record it logged
    executor| [executor: output cap reached (20000 lines or 4194304 bytes); later lines are dropped]
    executor| --- batch 2 ---

A line starts with the name of its stream (``stdout``, ``stderr``, or
``executor`` for the parent's own notes and batch separators) and ``| ``;
what the sandbox wrote follows, so it can never start a line: a protocol
that prints ``[executor: ...]`` or ``--- batch 3 ---`` gets
``stdout| [executor: ...]``. Characters some reader could take for a line
break (``\r``, ``\v``, ``\f``, ``\x1c`` to ``\x1e``, ``\x85``, U+2028,
U+2029) are written as escapes (``\r``, ``\x0b``, ``\u2028``), so
``str.splitlines`` and ``split("\n")`` see the same lines; other characters
are kept as written (escape them to print). In a batched task
``executor| --- batch N ---`` comes before each batch's lines. The tail is
cut only between lines, dropping whole lines at its front, and a cut
batched tail still starts with its first batch's separator.

Ledger rows written before the marks (format :data:`UNMARKED`, ``0``) hold
the lines as the sandbox wrote them: :func:`parse` gives their lines no
stream and no batch.
"""

from __future__ import annotations

import collections
import re
from dataclasses import dataclass
from typing import Any

MAX_CHARS = 64 * 1024
"""Characters of a tail kept in the ledger."""
FORMAT = 1
"""The ledger's ``log_format`` of a tail marked as above."""
UNMARKED = 0
"""The ledger's ``log_format`` of a tail written before lines were marked (plain lines)."""
NOTE_STREAM = "executor"
"""The stream of the parent's own notes and of batch separators."""
STREAMS = frozenset({"stdout", "stderr", NOTE_STREAM})
MARK_END = "| "

_ESCAPES = str.maketrans(
    {
        "\n": "\\n",
        "\r": "\\r",
        "\x0b": "\\x0b",
        "\x0c": "\\x0c",
        "\x1c": "\\x1c",
        "\x1d": "\\x1d",
        "\x1e": "\\x1e",
        "\x85": "\\x85",
        "\u2028": "\\u2028",
        "\u2029": "\\u2029",
    }
)
_SEPARATOR = re.compile(r"--- batch ([1-9][0-9]{0,9}) ---")


def render(stream: str, text: str) -> str:
    """One tail line: ``stream``'s mark, then ``text`` with its line breaks escaped, then a newline.

    Raises:
        ValueError: ``stream`` is not one of :data:`STREAMS`.
    """
    if stream not in STREAMS:
        raise ValueError(f"not a stream of the log tail: {stream!r}")
    return f"{stream}{MARK_END}{text.translate(_ESCAPES)}\n"


def separator(batch: int) -> str:
    """The tail line before batch ``batch``'s lines (1-based)."""
    return render(NOTE_STREAM, f"--- batch {batch} ---")


class Tail:
    """The last lines of one task's output across its batches, marked, within ``max_chars``.

    Not locked: its owner (:class:`executor.task.output.TaskOutput`) holds a lock.

    Args:
        batched: Whether each batch's lines get a separator before them.
        max_chars: The most characters :meth:`text` returns, separators included.
    """

    def __init__(self, *, batched: bool, max_chars: int = MAX_CHARS) -> None:
        self.batched = batched
        self.max_chars = max_chars
        self._lines: collections.deque[tuple[int, str]] = collections.deque()
        self._per_batch: collections.Counter[int] = collections.Counter()
        self._chars = 0

    def add(self, batch: int, stream: str, text: str) -> None:
        """Keep one line of ``batch``; the oldest whole lines go when the tail is full."""
        line = render(stream, text)
        self._lines.append((batch, line))
        self._chars += len(line)
        if self._per_batch[batch] == 0 and self.batched:
            self._chars += len(separator(batch))
        self._per_batch[batch] += 1
        while self._chars > self.max_chars and self._lines:
            old, dropped = self._lines.popleft()
            self._chars -= len(dropped)
            self._per_batch[old] -= 1
            if self._per_batch[old] == 0:
                del self._per_batch[old]
                if self.batched:
                    self._chars -= len(separator(old))

    def text(self) -> str:
        """The tail: each line marked, a separator before each batch's lines when batched."""
        out: list[str] = []
        current: int | None = None
        for batch, line in self._lines:
            if self.batched and batch != current:
                out.append(separator(batch))
                current = batch
            out.append(line)
        return "".join(out)


def cut(text: str, max_chars: int = MAX_CHARS) -> str:
    """The last whole lines of ``text`` within ``max_chars``: a cut never leaves part of a line."""
    if len(text) <= max_chars:
        return text
    if max_chars <= 0:
        return ""
    kept = text[-max_chars:]
    if text[-max_chars - 1] != "\n":
        kept = kept.partition("\n")[2]
    return kept


@dataclass(frozen=True)
class TailLine:
    """One line of a ledger's log tail.

    Attributes:
        stream: ``stdout``, ``stderr`` or ``executor``; ``None`` for a line of
            an unmarked (older) tail, whose stream is not known.
        batch: The batch (1-based) whose container wrote it; ``None`` when
            not known (an unmarked tail).
        line: The text, as the tail holds it (line breaks in it escaped).
    """

    stream: str | None
    batch: int | None
    line: str

    def to_dict(self) -> dict[str, Any]:
        """``{"stream", "batch", "line"}``, as ``tasks --json`` lists them."""
        return {"stream": self.stream, "batch": self.batch, "line": self.line}


def parse(text: str, log_format: int) -> list[TailLine]:
    """The lines of a tail the ledger holds in ``log_format``; separators become each line's batch.

    Lines of an unmarked tail (any other format) have neither stream nor
    batch; so has a line of a marked tail that carries no mark (which this
    code never writes).
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if log_format != FORMAT:
        return [TailLine(None, None, line) for line in lines]
    out: list[TailLine] = []
    # A tail without separators is an unbatched task's: its one batch.
    batch: int | None = None if any(_separator_batch(line) for line in lines) else 1
    for line in lines:
        number = _separator_batch(line)
        if number is not None:
            batch = number
            continue
        stream, mark, rest = line.partition(MARK_END)
        if mark and stream in STREAMS:
            out.append(TailLine(stream, batch, rest))
        else:
            out.append(TailLine(None, batch, line))
    return out


def _separator_batch(line: str) -> int | None:
    stream, mark, rest = line.partition(MARK_END)
    if stream != NOTE_STREAM or not mark:
        return None
    found = _SEPARATOR.fullmatch(rest)
    return int(found.group(1)) if found else None
