"""The read commands over a project database: ``results``, ``failed-files`` and ``tasks``.

With ``--json`` each prints exactly one JSON object on stdout; otherwise a
table. Everything in the database was written by or about untrusted protocols
(rows, file names, reasons, errors), so every string from it passes through
:func:`executor.cli.terminal.printable` and is printed as plain text, never as
rich markup. A read command never creates a database.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from executor.cli.terminal import printable
from executor.data.stores import open_store
from executor.errors import ProjectDatabaseError

if TYPE_CHECKING:
    from datetime import datetime
    from pathlib import Path

    from executor.data.store import FailedFileRecord, ProjectStore, ResultRecord, TaskRecord

# Rows are flat dicts whose keys the protocol chose: past this many distinct
# keys the table shows each row as one JSON column rather than grow sideways.
MAX_ROW_COLUMNS = 8
MAX_ERROR_SHOWN = 80


def results_command(db_path: Path, project: str, task_hash: str | None, as_json: bool) -> int:
    """Print the result rows of ``project`` (of one task hash if given), oldest first.

    Raises:
        ProjectDatabaseError: There is no database at ``db_path``, or it is unusable.
    """
    records = _open(db_path).results(project, task_hash)
    if as_json:
        _print_json({"project": project, "task_hash": task_hash, "results": [_record(r) for r in records]})
        return 0
    if not records:
        _console().print(Text(f"no results in project {printable(project)}{_for_hash(task_hash)}"))
        return 0
    keys = _row_keys(records)
    table = Table(title=Text(f"results of project {printable(project)}{_for_hash(task_hash)}"))
    for header in ("task", "task hash", "batch", "saved (UTC)"):
        table.add_column(header, no_wrap="UTC" in header)
    for key in keys if keys is not None else ["row"]:
        table.add_column(Text(printable(key)))
    for r in records:
        values = [_cell(r.row.get(k)) for k in keys] if keys is not None else [Text(printable(_dumps(r.row)))]
        table.add_row(
            Text(printable(r.task_id)),
            Text(printable(r.task_hash)),
            str(r.batch),
            _when(r.created_at),
            *values,
        )
    table.caption = f"{len(records)} row(s)"
    _console().print(table)
    return 0


def failed_files_command(db_path: Path, project: str, task_hash: str | None, as_json: bool) -> int:
    """Print the files that failed in ``project`` (under one task hash if given) and why.

    Raises:
        ProjectDatabaseError: There is no database at ``db_path``, or it is unusable.
    """
    records = _open(db_path).failed_files(project, task_hash)
    if as_json:
        _print_json(
            {"project": project, "task_hash": task_hash, "failed_files": [_record(r) for r in records]}
        )
        return 0
    if not records:
        _console().print(Text(f"no failed files in project {printable(project)}{_for_hash(task_hash)}"))
        return 0
    table = Table(title=Text(f"failed files of project {printable(project)}{_for_hash(task_hash)}"))
    for header in ("task hash", "file", "reason", "attempts", "last task", "updated (UTC)"):
        table.add_column(header, no_wrap="UTC" in header)
    for r in records:
        table.add_row(
            Text(printable(r.task_hash)),
            Text(printable(r.name)),
            Text(printable(r.reason)),
            str(r.attempts),
            Text(printable(r.last_task_id)),
            _when(r.updated_at),
        )
    table.caption = f"{len(records)} file(s)"
    _console().print(table)
    return 0


def tasks_command(db_path: Path, project: str | None, as_json: bool, limit: int | None = None) -> int:
    """Print the task ledger (of one project if given), newest first; at most ``limit`` tasks.

    Raises:
        ProjectDatabaseError: There is no database at ``db_path``, or it is unusable.
    """
    records = _open(db_path).tasks(project, limit=limit)
    if as_json:
        _print_json({"project": project, "tasks": [_task_json(r) for r in records]})
        return 0
    where = f" in project {printable(project)}" if project is not None else ""
    if not records:
        _console().print(Text(f"no tasks{where}"))
        return 0
    table = Table(title=Text(f"tasks{where}, newest first"))
    for header in ("task", "project", "status", "started (UTC)", "batches", "files", "error"):
        table.add_column(header, no_wrap="UTC" in header)
    for r in records:
        selection = r.selection
        files = f"{selection.get('selected', 0)} of {selection.get('total', 0)}" if selection else ""
        error = f"{r.error_type}: {r.error_message}" if r.error_type else (r.error_message or "")
        table.add_row(
            Text(printable(r.task_id)),
            Text(printable(r.project)),
            Text(printable(r.status), style=_status_style(r.status)),
            _when(r.started_at),
            f"{r.batches_done} of {r.total_batches}",
            files,
            Text(printable(_shorten(error, MAX_ERROR_SHOWN))),
        )
    table.caption = f"{len(records)} task(s)"
    _console().print(table)
    return 0


def _open(db_path: Path) -> ProjectStore:
    """The database at ``db_path``; a read command never makes one (a link there is refused, not followed)."""
    try:
        os.lstat(db_path)
    except (FileNotFoundError, NotADirectoryError):
        raise ProjectDatabaseError(f"no project database at {db_path}") from None
    except OSError as exc:
        raise ProjectDatabaseError(f"cannot read project database {db_path}: {exc.strerror}") from exc
    return open_store(db_path)


def _console() -> Console:
    # Looked up at each call so that a redirected sys.stdout is honoured.
    return Console(file=sys.stdout)


def _print_json(document: dict[str, Any]) -> None:
    # ensure_ascii: no control or bidi character from the database reaches the terminal raw.
    print(json.dumps(document, ensure_ascii=True))


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _record(record: ResultRecord | FailedFileRecord | TaskRecord) -> dict[str, Any]:
    """A record as JSON: its fields in order, times as ISO 8601 text."""
    fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(record)}
    return {name: _iso(value) if name.endswith("_at") else value for name, value in fields.items()}


def _task_json(record: TaskRecord) -> dict[str, Any]:
    """A ledger row as JSON: its fields, and its log tail's lines with their stream and batch."""
    return {**_record(record), "log_lines": [line.to_dict() for line in record.log_lines()]}


def _for_hash(task_hash: str | None) -> str:
    return f", task hash {printable(task_hash)}" if task_hash is not None else ""


def _row_keys(records: list[ResultRecord]) -> list[str] | None:
    """The rows' keys in order of first appearance, or None when there are too many to be columns."""
    keys: dict[str, None] = {}
    for r in records:
        for key in r.row:
            keys.setdefault(key)
            if len(keys) > MAX_ROW_COLUMNS:
                return None
    return list(keys)


def _dumps(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=False)


def _cell(value: object) -> Text:
    if value is None:
        return Text("")
    return Text(printable(value if isinstance(value, str) else _dumps(value)))


def _when(value: datetime) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S")


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _status_style(status: str) -> str:
    if status == "OK":
        return "green"
    if status == "RUNNING":
        return "yellow"
    return "red"
