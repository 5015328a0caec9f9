"""The SQLite store's file outcomes (``processed_files``, ``failed_files``): what each task hash did with it.

Statements only, each on a connection inside the caller's transaction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from executor.data.sqlite.values import time
from executor.data.store import BatchCommit, FailedFileRecord, FileStates

if TYPE_CHECKING:
    import sqlite3


def states(conn: sqlite3.Connection, project: str, task_hash: str) -> FileStates:
    """The files ``task_hash`` processed OK and those that failed, in ``project``."""
    processed = {
        str(name): (int(size), int(mtime_ns))
        for name, size, mtime_ns in conn.execute(
            "SELECT name, size, mtime_ns FROM processed_files WHERE project = ? AND task_hash = ?",
            (project, task_hash),
        )
    }
    failed: dict[str, tuple[str, int]] = {}
    failed_stamps: dict[str, tuple[int, int]] = {}
    for name, reason, attempts, size, mtime_ns in conn.execute(
        "SELECT name, reason, attempts, size, mtime_ns FROM failed_files WHERE project = ? AND task_hash = ?",
        (project, task_hash),
    ):
        failed[str(name)] = (str(reason), int(attempts))
        failed_stamps[str(name)] = (int(size), int(mtime_ns))
    return FileStates(processed=processed, failed=failed, failed_stamps=failed_stamps)


def record(conn: sqlite3.Connection, c: BatchCommit, now: str) -> None:
    """A batch's file outcomes: one processed (if recorded) leaves the failed, one failed the processed."""
    key = (c.project, c.task_hash)
    if c.record_processed:
        conn.executemany(
            "INSERT INTO processed_files (project, task_hash, name, size, mtime_ns, task_id,"
            " processed_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (project, task_hash, name)"
            " DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,"
            " task_id = excluded.task_id, processed_at = excluded.processed_at",
            [(*key, f.name, f.size, f.mtime_ns, c.task_id, now) for f in c.processed],
        )
        conn.executemany(
            "DELETE FROM failed_files WHERE project = ? AND task_hash = ? AND name = ?",
            [(*key, f.name) for f in c.processed],
        )
    conn.executemany(
        "INSERT INTO failed_files (project, task_hash, name, reason, attempts, size, mtime_ns,"
        " last_task_id, updated_at) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?)"
        " ON CONFLICT (project, task_hash, name) DO UPDATE SET reason = excluded.reason,"
        " attempts = failed_files.attempts + 1, size = excluded.size, mtime_ns = excluded.mtime_ns,"
        " last_task_id = excluded.last_task_id, updated_at = excluded.updated_at",
        [(*key, f.name, reason, f.size, f.mtime_ns, c.task_id, now) for f, reason in c.failed],
    )
    conn.executemany(
        "DELETE FROM processed_files WHERE project = ? AND task_hash = ? AND name = ?",
        [(*key, f.name) for f, _ in c.failed],
    )


def failed(conn: sqlite3.Connection, project: str, task_hash: str | None) -> list[FailedFileRecord]:
    """Files that failed in ``project`` (under one task hash if given), by task hash and name."""
    sql = (
        "SELECT task_hash, name, reason, attempts, last_task_id, updated_at FROM failed_files"
        " WHERE project = ?"
    )
    params: list[object] = [project]
    if task_hash is not None:
        sql += " AND task_hash = ?"
        params.append(task_hash)
    sql += " ORDER BY task_hash, name"
    return [
        FailedFileRecord(
            task_hash=th,
            name=name,
            reason=reason,
            attempts=int(attempts),
            last_task_id=last_task_id,
            updated_at=time(updated_at),
        )
        for th, name, reason, attempts, last_task_id, updated_at in conn.execute(sql, params).fetchall()
    ]
