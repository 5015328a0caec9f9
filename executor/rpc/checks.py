"""What the parent checks of each report the sandbox sends, and the refusal it answers with.

Plain functions over plain values (the serde's output), no state: file
outcomes and their names (against the task's data view), the size of a call
of result rows and each row (the contract's row rule), and the terminal
report. Each raises :class:`RequestRejected` with a public message.
"""

from __future__ import annotations

import json
import math
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from executor.data.fileoutcomes import FileKind
from executor.data.resultrows import RowError, check_row
from executor.events import FinishReport
from executor.outcome import Status
from executor.sandbox.contract import (
    MAX_ERROR_MESSAGE_CHARS,
    MAX_ERROR_TYPE_CHARS,
    MAX_FILE_NAME_CHARS,
    MAX_FILE_REASON_CHARS,
    MAX_FILES_PER_CALL,
    MAX_ROW_BYTES,
    MAX_ROWS_BYTES_PER_CALL,
    MAX_ROWS_PER_CALL,
    MAX_TRACEBACK_CHARS,
)

# The statuses a sandbox may report; the parent sets every other one itself.
FINISH_STATUSES = frozenset({Status.OK, Status.ABORT, Status.ERROR})
CHILD_TIMINGS = frozenset({"import", "config", "load", "run"})


class RequestRejected(Exception):
    """A request from the sandbox is invalid; ``code`` names the gRPC status."""

    def __init__(self, code: str, message: str, *, trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.public_message = message
        # Trailing metadata the refusal carries (the wire contract's signals).
        self.trailers = trailers


def _reject_constant(name: str) -> float:
    """NaN and Infinity are not JSON; the outcome must stay valid JSON."""
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is out of range")
    return value


# A JSON escape of a UTF-16 surrogate: the only way valid UTF-8 text can carry one.
_LONE_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _is_valid_text(text: str) -> bool:
    """Whether ``text`` is valid Unicode (no lone surrogate), so it encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(what: str, text: str) -> None:
    """Refuse text that no strict JSON parser or UTF-8 terminal accepts."""
    if not _is_valid_text(text):
        raise RequestRejected("INVALID_ARGUMENT", f"{what} holds a lone surrogate")


def _holds_lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string or key with a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not _is_valid_text(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _not_serialisable(timings: dict[str, float]) -> FinishReport:
    # Python's json reads "\ud800" as a lone surrogate, which no strict JSON
    # parser accepts and no UTF-8 terminal can print: the result is not data.
    return FinishReport(
        Status.ERROR,
        None,
        "ResultNotSerialisable",
        "the protocol's result holds a lone surrogate, which is not valid Unicode text",
        timings=dict(timings),
    )


# -- per-file outcomes ---------------------------------------------------------------
def file_outcomes(
    outcomes: list[tuple[str, FileKind, str]] | list[tuple[str, str, str]], data_dir: Path | None
) -> list[tuple[str, FileKind, str]]:
    """(name, kind, reason) per file, each checked; names against ``data_dir`` when given."""
    if not 0 < len(outcomes) <= MAX_FILES_PER_CALL:
        raise RequestRejected("INVALID_ARGUMENT", f"expected 1 to {MAX_FILES_PER_CALL} file outcomes")
    checked = []
    for name, given, reason in outcomes:
        try:
            kind = FileKind(given)
        except ValueError:
            raise RequestRejected("INVALID_ARGUMENT", "file outcome must be PROCESSED or FAILED") from None
        if len(reason) > MAX_FILE_REASON_CHARS:
            raise RequestRejected("INVALID_ARGUMENT", f"reason exceeds {MAX_FILE_REASON_CHARS} characters")
        _check_text("file outcome reason", reason)
        checked.append((file_name(name, data_dir), kind, reason))
    return checked


def file_name(name: str, data_dir: Path | None) -> str:
    """``name`` if it is a plain relative path to a regular file in the datasource."""
    if not name or len(name) > MAX_FILE_NAME_CHARS or "\0" in name:
        raise RequestRejected("INVALID_ARGUMENT", "file name is empty, too long or holds NUL")
    _check_text("file name", name)
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or name != str(path):
        raise RequestRejected(
            "INVALID_ARGUMENT", "file name must be a plain relative path inside the datasource"
        )
    if data_dir is not None:
        current = data_dir
        for part in path.parts:
            current = current / part
            try:
                st = current.lstat()
            except OSError:
                raise RequestRejected("INVALID_ARGUMENT", "no such file in the datasource") from None
            if stat.S_ISLNK(st.st_mode):
                raise RequestRejected("INVALID_ARGUMENT", "file name may not pass through a symlink")
        if not stat.S_ISREG(st.st_mode):
            raise RequestRejected("INVALID_ARGUMENT", "file name must name a regular file")
    return name


# -- result rows -------------------------------------------------------------------------
def rows_call_count(rows_json: list[str]) -> None:
    """Refuse a call of no rows or of more than a call may hold."""
    if not 0 < len(rows_json) <= MAX_ROWS_PER_CALL:
        raise RequestRejected("INVALID_ARGUMENT", f"expected 1 to {MAX_ROWS_PER_CALL} result rows")


def rows_call_size(rows_json: list[str]) -> int:
    """The UTF-8 bytes of a call's rows, each within a row's cap and all within a call's."""
    size = 0
    for index, text in enumerate(rows_json):
        try:
            row_bytes = len(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise RequestRejected("INVALID_ARGUMENT", f"result row {index} holds a lone surrogate") from None
        if row_bytes > MAX_ROW_BYTES:
            raise RequestRejected(
                "INVALID_ARGUMENT",
                f"result row {index} is {row_bytes} bytes; the limit is {MAX_ROW_BYTES}",
            )
        size += row_bytes
    if size > MAX_ROWS_BYTES_PER_CALL:
        raise RequestRejected(
            "INVALID_ARGUMENT",
            f"result rows of one call may hold at most {MAX_ROWS_BYTES_PER_CALL} bytes",
        )
    return size


def rows(rows_json: list[str]) -> None:
    """Refuse the call if any row is not one flat JSON object of scalars (the contract's row rule)."""
    for index, text in enumerate(rows_json):
        try:
            check_row(text)
        except RowError as exc:
            raise RequestRejected("INVALID_ARGUMENT", f"result row {index} {exc}") from None


# -- the terminal report -----------------------------------------------------------------
def finish_report(
    status: Status,
    result_json: str,
    error_type: str,
    error_message: str,
    traceback: str,
    timings: dict[str, float],
    max_result_bytes: int,
) -> FinishReport:
    """The sandbox's terminal report, checked: a result past the cap or not text ends the task as an error."""
    if status not in FINISH_STATUSES:
        raise RequestRejected("INVALID_ARGUMENT", "status must be OK, ABORT or ERROR")
    if len(error_type) > MAX_ERROR_TYPE_CHARS or len(error_message) > MAX_ERROR_MESSAGE_CHARS:
        raise RequestRejected("INVALID_ARGUMENT", "error type or message too long")
    if len(traceback) > MAX_TRACEBACK_CHARS:
        raise RequestRejected("INVALID_ARGUMENT", f"traceback exceeds {MAX_TRACEBACK_CHARS} characters")
    for what, text in (
        ("error type", error_type),
        ("error message", error_message),
        ("traceback", traceback),
    ):
        _check_text(what, text)
    if len(timings) > len(CHILD_TIMINGS) or not set(timings) <= CHILD_TIMINGS:
        raise RequestRejected("INVALID_ARGUMENT", "unknown timing names")
    if not all(math.isfinite(v) and 0 <= v < 1e7 for v in timings.values()):
        raise RequestRejected("INVALID_ARGUMENT", "timings must be finite, non-negative seconds")
    try:
        size: int | None = len(result_json.encode("utf-8"))
    except UnicodeEncodeError:
        size = None
    if size is None:
        report = _not_serialisable(timings)
    elif size > max_result_bytes:
        report = FinishReport(
            Status.ERROR,
            None,
            "ResultTooLarge",
            f"the protocol's result is {size} bytes; the limit is {max_result_bytes}",
            timings=dict(timings),
        )
    else:
        try:
            # json.loads builds only dicts, lists, strings and numbers: safe on
            # untrusted text, unlike pickle (design invariant 1).
            result = (
                json.loads(result_json, parse_constant=_reject_constant, parse_float=_finite_float)
                if result_json
                else None
            )
        except (ValueError, RecursionError):
            raise RequestRejected("INVALID_ARGUMENT", "result_json is not valid JSON") from None
        if _LONE_SURROGATE_ESCAPE.search(result_json) and _holds_lone_surrogate(result):
            report = _not_serialisable(timings)
        else:
            report = FinishReport(Status(status), result, error_type, error_message, traceback, dict(timings))
    return report
