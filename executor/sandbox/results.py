"""Result rows and per-file outcomes a protocol reports: checked here by the contract's rule, then sent."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import grpc

from executor.sandbox.contract import (
    MAX_FILE_REASON_CHARS,
    MAX_ROW_BYTES,
    MAX_ROWS_BYTES_PER_CALL,
    MAX_ROWS_PER_CALL,
    ReportCase,
    row_problem,
)
from executor.sandbox.errors import ReportRefused, _status
from executor.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from executor.sandbox.client import ParentClient


class Reports:
    """What a protocol reports besides progress: result rows and per-file outcomes (a part of ``ctx``)."""

    _client: ParentClient

    def save_results(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Hand result rows to the parent, which validates and keeps them.

        Each row maps column names to JSON scalars: ``str``, ``int`` (within
        signed 64 bits), finite ``float``, ``bool`` or ``None``. No nested
        lists or dicts, 1 to 256 columns, names of 1 to 128 characters with
        no control characters, at most 64 KiB of JSON per row. Rows travel in
        calls of up to 1000 rows (and 1 MiB); one sandbox (a task, or one
        batch of a batched task) may save 100,000 rows and 32 MiB in all.
        For example::

            ctx.save_results([{"file": "a.csv", "rows": 120, "mean": 4.2}])

        Every row is checked here before anything is sent, so a bad row sends
        nothing. The parent accepts or refuses each call whole: if it refuses
        one (a per-task cap, or the task has finished), the rows of the calls
        before it are kept, and the message says how many.

        Raises:
            ReportRefused: A row is not such a mapping (``code`` empty), or the
                parent refused a call (``code`` says why) or is gone.
        """
        if isinstance(rows, (Mapping, str, bytes)):
            raise ReportRefused("save_results takes an iterable of rows (dicts); wrap a single row in a list")
        texts = [_row_text(index, row) for index, row in enumerate(rows)]
        saved = 0
        for batch in _row_calls(texts):
            try:
                self._send_rows(batch)
            except grpc.RpcError as exc:
                code, details = _status(exc)
                raise ReportRefused(
                    f"result rows {saved} to {saved + len(batch) - 1} refused: {details} "
                    f"({saved} row(s) of this call saved before them)",
                    code,
                ) from None
            saved += len(batch)

    def _send_rows(self, rows_json: list[str]) -> None:
        """One Report of rows; RpcErrors propagate."""
        self._client.count(progress=1)
        self._client.report(ReportCase.ROWS, pb.ResultRows(rows_json=rows_json))

    def file_processed(self, name: str) -> None:
        """Record that datasource file ``name`` (relative to ``data_dir``) was processed.

        Raises:
            ReportRefused: The name is not a plain regular file of the datasource,
                a cap is reached, or the parent is gone.
        """
        self._report_file(name, "PROCESSED", "")

    def file_failed(self, name: str, reason: str) -> None:
        """Record that datasource file ``name`` failed, and why.

        Raises:
            ReportRefused: As for :meth:`file_processed`.
        """
        self._report_file(name, "FAILED", reason)

    def _report_file(self, name: str, kind: str, reason: str) -> None:
        self._client.count(progress=1)
        outcome = pb.FileOutcome(name=name, kind=kind, reason=reason[:MAX_FILE_REASON_CHARS])
        try:
            self._client.report(ReportCase.FILES, pb.FileOutcomes(files=[outcome]))
        except grpc.RpcError as exc:
            code, details = _status(exc)
            raise ReportRefused(f"file outcome for {name!r} refused: {details}", code) from None

    def report(self, kind: str, /, **fields: Any) -> None:
        """Send a report of a kind that has no method of its own: ``fields`` of the contract's case ``kind``.

        Every kind of :class:`~executor.sandbox.contract.ReportCase` travels
        so, checked by the parent as its own kind and charged to the
        task's budget; one a newer contract adds needs nothing more here.
        For example ``ctx.report("metric", name="loss", value=0.25)`` where
        the contract has metrics.

        Raises:
            ReportRefused: No such kind, a field it does not have or of the
                wrong type (``code`` empty), or the parent refused it or is gone.
        """
        try:
            case = ReportCase(kind)
        except ValueError:
            raise ReportRefused(
                f"no report of kind {kind!r}; the kinds are {', '.join(ReportCase)}"
            ) from None
        try:
            message = type(getattr(pb.ReportRequest(), case.value))(**fields)
        except (TypeError, ValueError) as exc:
            raise ReportRefused(f"{kind} report refused: {exc}") from None
        self._client.count(progress=1)
        try:
            self._client.report(case, message)
        except grpc.RpcError as exc:
            code, details = _status(exc)
            raise ReportRefused(f"{kind} report refused: {details}", code) from None


def _row_text(index: int, row: object) -> str:
    """One result row as compact JSON text, after the contract's row rule (the parent's too).

    Raises:
        ReportRefused: The row breaks one (with no code: nothing was sent).
    """
    if not isinstance(row, Mapping):
        raise ReportRefused(f"result row {index} is a {type(row).__name__}, not a dict of column -> value")
    problem = row_problem(row)
    if problem is not None:
        why, column = problem
        where = f", column {_short(column)}," if column is not None else ""
        raise ReportRefused(f"result row {index}{where} {why}")
    text = json.dumps(dict(row), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    size = len(text.encode("utf-8"))
    if size > MAX_ROW_BYTES:
        raise ReportRefused(f"result row {index} is {size} bytes of JSON; the limit is {MAX_ROW_BYTES}")
    return text


def _row_calls(texts: list[str]) -> Iterator[list[str]]:
    """``texts`` in runs that fit one Report of rows (rows and bytes)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        row_bytes = len(text.encode("utf-8"))
        if batch and (len(batch) == MAX_ROWS_PER_CALL or size + row_bytes > MAX_ROWS_BYTES_PER_CALL):
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += row_bytes
    if batch:
        yield batch


def _short(value: object) -> str:
    """A bounded repr for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
