"""Result rows a task saves: what a row may be, the caps on what the parent keeps, the ledger.

A sandbox may hand the parent many calls of result rows; all of them are held
in the parent's memory until the task (or batch) ends and its rows are
committed. Each per-task cap below bounds the parent, not the sandbox. Rows
are held as the JSON text they came as, already validated, and parsed when
read: a parsed row costs several times its text (a dict, a key and a value
object per column), so the bytes cap bounds what is really held.
"""

from __future__ import annotations

import json
import math
from typing import Any

from executor.errors import ResultLimitError as ResultLimitError

# Per call and per row (the wire contract, which the sandbox checks before it sends).
from executor.sandbox.contract import MAX_COLUMN_NAME_CHARS as MAX_COLUMN_NAME_CHARS
from executor.sandbox.contract import MAX_COLUMNS as MAX_COLUMNS
from executor.sandbox.contract import MAX_ROW_BYTES as MAX_ROW_BYTES
from executor.sandbox.contract import MAX_ROW_INT, MIN_ROW_INT, is_column_name
from executor.sandbox.contract import MAX_ROWS_BYTES_PER_CALL as MAX_ROWS_BYTES_PER_CALL
from executor.sandbox.contract import MAX_ROWS_PER_CALL as MAX_ROWS_PER_CALL

MAX_ROWS_PER_TASK = 100_000
"""Result rows one task may save; a call that would pass it is refused whole."""
MAX_RESULT_ROWS_BYTES_PER_TASK = 32 * 1024 * 1024
"""UTF-8 bytes of row text one task may save; a call that would pass it is refused whole."""


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


_SCALARS = (str, int, float, type(None))  # bool is an int


def check_row(text: str) -> None:
    """Refuse row text that is not one flat JSON object of scalars.

    The object has 1 to MAX_COLUMNS columns, each named as
    :func:`~executor.sandbox.contract.is_column_name` allows (no name twice)
    and holding a string (valid Unicode), an integer within signed 64 bits,
    a finite number, a boolean or null. The text's size is the caller's to
    check, before this parses it.

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
    if not 0 < len(row) <= MAX_COLUMNS:
        raise RowError(f"must have 1 to {MAX_COLUMNS} columns")
    for name, value in row.items():
        if not is_column_name(name):
            raise RowError(
                f"has a column name that is not 1 to {MAX_COLUMN_NAME_CHARS} characters "
                "free of control characters and lone surrogates"
            )
        if not isinstance(value, _SCALARS):
            raise RowError("has a value that is not a JSON scalar (string, number, boolean or null)")
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # a "\ud800" escape: not text any strict reader accepts
                raise RowError("holds a lone surrogate") from None


class ResultLedger:
    """The result rows of one task, kept within the caps above.

    Not thread-safe: the session calls it under its own lock.
    """

    def __init__(self) -> None:
        self._rows: list[str] = []
        self.bytes = 0

    def room_for(self, rows: int, size: int) -> None:
        """Check that ``rows`` more rows of ``size`` bytes in all fit the task's caps.

        Raises:
            ResultLimitError: They do not.
        """
        if len(self._rows) + rows > MAX_ROWS_PER_TASK:
            raise ResultLimitError(
                f"at most {MAX_ROWS_PER_TASK} result rows per task ({len(self._rows)} saved already)"
            )
        if self.bytes + size > MAX_RESULT_ROWS_BYTES_PER_TASK:
            raise ResultLimitError(
                f"at most {MAX_RESULT_ROWS_BYTES_PER_TASK} bytes of result rows per task "
                f"({self.bytes} saved already)"
            )

    def record(self, rows: list[str], size: int) -> None:
        """Keep validated row texts whose UTF-8 sizes sum to ``size``; all of them or none.

        Raises:
            ResultLimitError: They would pass a per-task cap; nothing is kept then.
        """
        self.room_for(len(rows), size)
        self._rows.extend(rows)
        self.bytes += size

    def texts(self) -> list[str]:
        """A copy of the list of row texts kept so far, in the order saved."""
        return list(self._rows)

    def __len__(self) -> int:
        return len(self._rows)


def parse_rows(texts: list[str]) -> list[dict[str, Any]]:
    """Validated row texts as fresh dicts (each call builds new ones: a caller may change them)."""
    return [json.loads(text) for text in texts]
