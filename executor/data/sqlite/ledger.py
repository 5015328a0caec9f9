"""The SQLite store's ledger table (``tasks``): one row per task, RUNNING until it ends.

Statements only, each on a connection inside the caller's transaction
(:class:`executor.data.sqlite.store.ProjectDatabase` opens it and says what a
refusal means).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from executor.data import logtail
from executor.data.sqlite.values import iso, limit_clause, time
from executor.data.store import (
    LOST,
    LOST_ERROR_TYPE,
    LOST_MESSAGE,
    RUNNING,
    TaskEnd,
    TaskRecord,
    TaskStart,
    json_object,
    to_json,
)

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Iterable, Sequence

_COLUMNS = (
    "task_id, task_hash, project, modeller, datasource, bundle_sha256, policy_json, runtime,"
    " status, error_type, error_message, timings_json, selection_json, total_batches, batches_done,"
    " test_run, started_at, ended_at, log_tail, log_format"
)


def exists(conn: sqlite3.Connection, task_id: str) -> bool:
    """Whether the ledger has a row for ``task_id``."""
    return conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone() is not None


def insert(conn: sqlite3.Connection, r: TaskStart) -> None:
    """The row of a task starting, RUNNING with no batch done."""
    conn.execute(
        "INSERT INTO tasks (task_id, task_hash, project, modeller, datasource, bundle_sha256,"
        " policy_json, runtime, status, selection_json, total_batches, batches_done, test_run,"
        " started_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
        (
            r.task_id,
            r.task_hash,
            r.project,
            r.modeller,
            r.datasource,
            r.bundle_sha256,
            to_json(r.policy),
            r.runtime,
            RUNNING,
            to_json(r.selection),
            r.total_batches,
            int(r.test_run),
            iso(r.started_at),
            r.owner,
        ),
    )


def running_owned(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """``(task_id, owner)`` of every RUNNING row that has an owner."""
    rows = conn.execute(
        "SELECT task_id, owner FROM tasks WHERE status = ? AND owner != ''", (RUNNING,)
    ).fetchall()
    return [(str(task_id), str(owner)) for task_id, owner in rows]


def mark_lost(conn: sqlite3.Connection, task_ids: Iterable[str], ended_at: str) -> None:
    """Close the rows of ``task_ids`` still RUNNING as LOST."""
    conn.executemany(
        "UPDATE tasks SET status = ?, error_type = ?, error_message = ?, ended_at = ?"
        " WHERE task_id = ? AND status = ?",
        [(LOST, LOST_ERROR_TYPE, LOST_MESSAGE, ended_at, task_id, RUNNING) for task_id in task_ids],
    )


def complete(conn: sqlite3.Connection, e: TaskEnd) -> bool:
    """Complete a task's row, the log tail cut to its last whole lines; whether there was one."""
    cursor = conn.execute(
        "UPDATE tasks SET status = ?, error_type = ?, error_message = ?, timings_json = ?,"
        " ended_at = ?, log_tail = ?, log_format = ?, batches_done = ?, selection_json = ?"
        " WHERE task_id = ?",
        (
            e.status,
            e.error_type,
            e.error_message,
            to_json(e.timings),
            iso(e.ended_at),
            logtail.cut(e.log_tail, logtail.MAX_CHARS),
            e.log_format,
            e.batches_done,
            to_json(e.selection),
            e.task_id,
        ),
    )
    return cursor.rowcount == 1


def running_batches(conn: sqlite3.Connection, task_id: str) -> tuple[str, str, int] | None:
    """``(project, task_hash, total_batches)`` of a RUNNING task, or ``None`` if it is not running."""
    row = conn.execute(
        "SELECT project, task_hash, status, total_batches FROM tasks WHERE task_id = ?", (task_id,)
    ).fetchone()
    if row is None or row[2] != RUNNING:
        return None
    return str(row[0]), str(row[1]), int(row[3])


def count_batch_done(conn: sqlite3.Connection, task_id: str) -> None:
    """One more batch of the task done."""
    conn.execute("UPDATE tasks SET batches_done = batches_done + 1 WHERE task_id = ?", (task_id,))


def select(conn: sqlite3.Connection, project: str | None, limit: int | None) -> list[TaskRecord]:
    """Rows (of one project if given), newest first, at most ``limit``."""
    sql = f"SELECT {_COLUMNS} FROM tasks"  # noqa: S608  (constant column names)
    params: list[object] = []
    if project is not None:
        sql += " WHERE project = ?"
        params.append(project)
    sql += " ORDER BY started_at DESC, rowid DESC" + limit_clause(limit, params)
    return [_record(row) for row in conn.execute(sql, params).fetchall()]


def _record(row: Sequence[Any]) -> TaskRecord:
    (
        task_id,
        task_hash,
        project,
        modeller,
        datasource,
        bundle_sha256,
        policy_json,
        runtime,
        status,
        error_type,
        error_message,
        timings_json,
        selection_json,
        total_batches,
        batches_done,
        test_run,
        started_at,
        ended_at,
        log_tail,
        log_format,
    ) = row
    return TaskRecord(
        task_id=task_id,
        task_hash=task_hash,
        project=project,
        modeller=modeller,
        datasource=datasource,
        bundle_sha256=bundle_sha256,
        policy=json_object(policy_json),
        runtime=runtime,
        status=status,
        error_type=error_type,
        error_message=error_message,
        timings=json_object(timings_json),
        selection=json_object(selection_json),
        total_batches=int(total_batches),
        batches_done=int(batches_done),
        test_run=bool(test_run),
        started_at=time(started_at),
        ended_at=time(ended_at) if ended_at is not None else None,
        log_tail=log_tail,
        log_format=int(log_format),
    )
