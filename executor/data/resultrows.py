"""Result rows a task saves: what a row may be, the caps on them, and where they go as they arrive.

A sandbox hands the parent result rows in calls of at most 1000 rows and
1 MiB. Each call's rows, once validated, are handed on at once to the task's
store (the project database, where they stay unseen until their batch
commits) and not kept: the parent holds a call's rows while it checks and
stores them, never a batch's. Without a store they are counted and dropped.

Two sets of caps bound what a task may save: per batch (one sandbox:
:data:`MAX_ROWS_PER_BATCH` rows and :data:`MAX_ROWS_BYTES_PER_BATCH` bytes, as
before) and per task across all its batches (the policy's ``max_rows`` and
``max_rows_mb``). A call that would pass either is refused whole.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from typing import Any, Protocol

from executor.errors import ProjectDatabaseError
from executor.errors import ResultLimitError as ResultLimitError

# Per call and per row (the wire contract, which the sandbox checks before it sends).
from executor.sandbox.contract import MAX_COLUMN_NAME_CHARS as MAX_COLUMN_NAME_CHARS
from executor.sandbox.contract import MAX_COLUMNS as MAX_COLUMNS
from executor.sandbox.contract import MAX_ROW_BYTES as MAX_ROW_BYTES
from executor.sandbox.contract import MAX_ROW_INT, MIN_ROW_INT, row_problem
from executor.sandbox.contract import MAX_ROWS_BYTES_PER_CALL as MAX_ROWS_BYTES_PER_CALL
from executor.sandbox.contract import MAX_ROWS_PER_CALL as MAX_ROWS_PER_CALL

log = logging.getLogger(__name__)

MAX_ROWS_PER_BATCH = 100_000
"""Result rows one sandbox (a task, or a batch of it) may save; a call that would pass it is refused whole."""
MAX_ROWS_BYTES_PER_BATCH = 32 * 1024 * 1024
"""UTF-8 bytes of row text one sandbox may save; a call that would pass it is refused whole."""
STORE_WAIT_S = 10.0
"""How long one call's rows may wait for the store (the task's other calls, then the database's lock).

Twice this stays under the sandbox's own deadline for the call (30 s), so a
call the parent gives up on is one the sandbox hears refused, never one it
gave up on while the parent still stored it.
"""


class RowError(ValueError):
    """Why one row's text is refused: a public message, never echoing the row."""


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    row = dict(pairs)
    if len(row) != len(pairs):
        raise RowError("repeats a column name")
    return row


def _int(text: str) -> int:
    # 20 characters hold every signed 64-bit integer; longer text is never
    # converted (Python's own digit limit would raise with the digits in its message).
    value = int(text) if len(text) <= 20 else MAX_ROW_INT + 1
    if not MIN_ROW_INT <= value <= MAX_ROW_INT:
        raise RowError("holds an integer outside the signed 64-bit range")
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RowError("holds a number outside the float range")
    return value


def _constant(name: str) -> Any:
    raise RowError(f"holds {name}, which is not JSON")


def check_row(text: str) -> None:
    """Refuse row text that is not one flat JSON object of scalars.

    The text must parse as JSON (no name twice, no NaN or Infinity) into an
    object that keeps the contract's row rule
    (:func:`~executor.sandbox.contract.row_problem`, which the sandbox
    applies too). The text's size is the caller's to check, before this
    parses it.

    Raises:
        RowError: Why, in words fit for the sandbox ("result row 3 " + it).
    """
    try:
        # json.loads builds only dicts, lists, strings and numbers: safe on
        # untrusted text (design invariant 1). The hooks refuse what JSON
        # does not define or a database column cannot hold.
        row = json.loads(
            text, object_pairs_hook=_object, parse_int=_int, parse_float=_float, parse_constant=_constant
        )
    except RowError:
        raise
    except (ValueError, RecursionError):
        raise RowError("is not valid JSON") from None
    if not isinstance(row, dict):
        raise RowError("is not a JSON object")
    problem = row_problem(row)
    if problem is not None:
        raise RowError(problem[0])  # never the column: the message does not echo the row


class RowsClosed(Exception):
    """The batch has ended: its rows are sealed, and no more may join them."""


class RowsNotStored(Exception):
    """The store could not take a call's rows (the database stayed locked, say); none was kept.

    The message is public: it names no path of the host.
    """


class RowSink(Protocol):
    """Where a sandbox's validated rows go as they arrive (what a task session hands them to)."""

    def room_for(self, rows: int, size: int) -> None:
        """Check that ``rows`` more rows of ``size`` bytes fit every cap; raise ResultLimitError if not."""

    def save(self, rows: list[str], size: int) -> None:
        """Hand on validated row texts of ``size`` bytes in all; all of them or none.

        Raises:
            ResultLimitError: They would pass a cap.
            RowsClosed: The batch has ended.
            RowsNotStored: The store failed; nothing was kept.
        """


Store = Callable[[int, list[str]], None]
"""Stores a batch's rows: ``store(batch, texts)``, all or none (it may raise ProjectDatabaseError)."""


class TaskRows:
    """A task's result rows across its batches: the caps, and the store each call's rows go to.

    Thread-safe: calls of a batch are stored one at a time, in the order they
    take the lock, so rows keep the order they were saved in.

    Args:
        max_rows: Rows the whole task may save (every batch together).
        max_bytes: UTF-8 bytes of row text the whole task may save.
        store: Where rows go (e.g. :meth:`ProjectStore.stage_rows
            <executor.data.store.ProjectStore.stage_rows>` for this task);
            ``None`` counts them and keeps nothing.
        task_id: For the log.
    """

    def __init__(
        self, *, max_rows: int, max_bytes: int, store: Store | None = None, task_id: str = ""
    ) -> None:
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self._store = store
        self._task_id = task_id
        self._lock = threading.Lock()
        self.rows = 0
        self.bytes = 0

    def batch(self, number: int) -> BatchRows:
        """The sink of batch ``number`` (1-based), with the per-batch caps."""
        return BatchRows(self, number)

    def _room(self, batch: BatchRows, rows: int, size: int) -> None:
        """Check both caps (lock held, or a racy early look)."""
        if batch.rows + rows > MAX_ROWS_PER_BATCH:
            raise ResultLimitError(
                f"at most {MAX_ROWS_PER_BATCH} result rows per batch ({batch.rows} saved already)"
            )
        if batch.bytes + size > MAX_ROWS_BYTES_PER_BATCH:
            raise ResultLimitError(
                f"at most {MAX_ROWS_BYTES_PER_BATCH} bytes of result rows per batch"
                f" ({batch.bytes} saved already)"
            )
        if self.rows + rows > self.max_rows:
            raise ResultLimitError(
                f"at most {self.max_rows} result rows per task, all batches together"
                f" ({self.rows} saved already)"
            )
        if self.bytes + size > self.max_bytes:
            raise ResultLimitError(
                f"at most {self.max_bytes} bytes of result rows per task, all batches together"
                f" ({self.bytes} saved already)"
            )

    def _save(self, batch: BatchRows, rows: list[str], size: int) -> None:
        if not self._lock.acquire(timeout=STORE_WAIT_S):
            raise RowsNotStored(
                "the parent is still storing this task's earlier rows; none of these was saved"
            )
        try:
            if batch.sealed:
                raise RowsClosed(f"batch {batch.number} has ended")
            self._room(batch, len(rows), size)
            if self._store is not None:
                try:
                    self._store(batch.number, rows)
                except ProjectDatabaseError as exc:
                    log.warning(
                        "task %s: %d result rows of batch %d not stored: %s",
                        self._task_id,
                        len(rows),
                        batch.number,
                        exc,
                    )
                    raise RowsNotStored(
                        "the parent could not store these rows (its project database is busy or failing);"
                        " none of them was saved"
                    ) from None
            self.rows += len(rows)
            self.bytes += size
            batch.rows += len(rows)
            batch.bytes += size
        finally:
            self._lock.release()

    def _seal(self, batch: BatchRows) -> None:
        with self._lock:  # waits for a call being stored: it lands before the seal
            batch.sealed = True


class BatchRows:
    """The rows of one batch of a task: a :class:`RowSink` that counts, caps and hands on.

    Made by :meth:`TaskRows.batch`. Keeps no row: ``rows`` and ``bytes``
    count those stored.
    """

    def __init__(self, task: TaskRows, number: int) -> None:
        self.task = task
        self.number = number
        self.rows = 0
        self.bytes = 0
        self.sealed = False

    def room_for(self, rows: int, size: int) -> None:
        """Check that ``rows`` more rows of ``size`` bytes fit the batch's and the task's caps.

        An early look, before the rows are parsed; :meth:`save` checks again.

        Raises:
            ResultLimitError: They do not.
        """
        self.task._room(self, rows, size)

    def save(self, rows: list[str], size: int) -> None:
        """Store validated row texts whose UTF-8 sizes sum to ``size``; all of them or none.

        Raises:
            ResultLimitError: They would pass a cap (of the batch or the task).
            RowsClosed: The batch has ended (:meth:`seal`).
            RowsNotStored: The store failed, or stayed busy for :data:`STORE_WAIT_S`.
        """
        self.task._save(self, rows, size)

    def seal(self) -> int:
        """End the batch: a call being stored finishes first, later ones are refused. The rows stored."""
        self.task._seal(self)
        return self.rows


def counting_sink() -> BatchRows:
    """A sink that keeps no row and stores none: the per-batch caps only (no task, no database)."""
    return TaskRows(max_rows=MAX_ROWS_PER_BATCH, max_bytes=MAX_ROWS_BYTES_PER_BATCH).batch(1)
