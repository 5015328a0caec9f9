"""The SQLite store's result rows and batch records (``results``, ``batches``): unseen until committed.

A batch's rows are written as they arrive (``pending``), and a reader sees a
row once its batch has a ``batches`` row (or when it was committed with its
batch before schema version 5, ``pending`` 0). Committing a batch adds that
row and never touches the rows, so it holds the write lock for milliseconds
however many there are. Statements only, each on a connection inside the
caller's transaction.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from executor.data.sqlite.values import iso, limit_clause, time
from executor.data.store import BatchCommit, ResultRecord

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Sequence

DISCARD_CHUNK_ROWS = 1000
"""Most result rows one transaction of ``ProjectDatabase.discard_rows`` removes."""
DISCARD_CHUNK_BYTES = 1024 * 1024
"""Most bytes of result rows one such transaction removes (after its first row)."""


def committed(conn: sqlite3.Connection, task_id: str, batch: int) -> bool:
    """Whether the task's batch has committed (it has a batch row)."""
    found = conn.execute("SELECT 1 FROM batches WHERE task_id = ? AND batch = ?", (task_id, batch))
    return found.fetchone() is not None


def stage(
    conn: sqlite3.Connection, key: tuple[str, str], task_id: str, batch: int, rows: Sequence[str], now: str
) -> None:
    """Write a running batch's rows (JSON texts) pending, in order; ``key`` is (project, task hash)."""
    conn.executemany(
        "INSERT INTO results (project, task_hash, task_id, batch, row_json, created_at, pending,"
        " size) VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
        [(*key, task_id, batch, row, now, len(row.encode("utf-8"))) for row in rows],
    )


def uncommitted_chunk(conn: sqlite3.Connection, task_id: str, batch: int | None) -> list[int]:
    """Ids of the next chunk of rows staged for batches that never committed (at most 1000 rows and 1 MiB)."""
    # Read from the index (task_id, batch, pending, size) alone.
    sql = (
        "SELECT r.id, r.size FROM results r WHERE r.task_id = ?1 AND (?2 IS NULL OR r.batch = ?2)"
        " AND r.pending = 1 AND NOT EXISTS"
        " (SELECT 1 FROM batches b WHERE b.task_id = r.task_id AND b.batch = r.batch) LIMIT ?3"
    )
    chunk: list[int] = []
    size = 0
    for row_id, row_size in conn.execute(sql, (task_id, batch, DISCARD_CHUNK_ROWS)):
        if chunk and size + int(row_size) > DISCARD_CHUNK_BYTES:
            break
        chunk.append(int(row_id))
        size += int(row_size)
    return chunk


def delete(conn: sqlite3.Connection, row_ids: Sequence[int]) -> None:
    """Remove rows by id."""
    conn.executemany("DELETE FROM results WHERE id = ?", [(row_id,) for row_id in row_ids])


def insert_batch(conn: sqlite3.Connection, c: BatchCommit, stats_json: str) -> None:
    """The batch row that makes the batch's staged rows seen, with its counts and statistics."""
    # Counted from the index: no row is read, let alone rewritten.
    (rows,) = conn.execute(
        "SELECT count(*) FROM results WHERE task_id = ? AND batch = ? AND pending = 1",
        (c.task_id, c.batch),
    ).fetchone()
    conn.execute(
        "INSERT INTO batches (task_id, batch, project, task_hash, total_batches, files, processed,"
        " failed, rows, started_at, ended_at, stats_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            c.task_id,
            c.batch,
            c.project,
            c.task_hash,
            c.total_batches,
            len(c.processed) + len(c.failed),
            len(c.processed),
            len(c.failed),
            int(rows),
            iso(c.started_at),
            iso(c.ended_at),
            stats_json,
        ),
    )


def select(
    conn: sqlite3.Connection,
    project: str,
    task_hash: str | None,
    limit: int | None,
    task_id: str | None,
    batch: int | None,
) -> list[ResultRecord]:
    """Committed rows of ``project``, oldest first, narrowed by the filters given."""
    sql = (
        "SELECT r.task_id, r.task_hash, r.batch, r.row_json, r.created_at FROM results r"
        " WHERE r.project = ? AND (r.pending = 0 OR EXISTS"
        " (SELECT 1 FROM batches b WHERE b.task_id = r.task_id AND b.batch = r.batch))"
    )
    params: list[object] = [project]
    for column, value in (("task_hash", task_hash), ("task_id", task_id), ("batch", batch)):
        if value is not None:
            sql += f" AND r.{column} = ?"
            params.append(value)
    sql += " ORDER BY r.id" + limit_clause(limit, params)
    return [
        ResultRecord(
            task_id=tid,
            task_hash=th,
            batch=int(number),
            row=json.loads(row_json),
            created_at=time(created_at),
        )
        for tid, th, number, row_json, created_at in conn.execute(sql, params).fetchall()
    ]
