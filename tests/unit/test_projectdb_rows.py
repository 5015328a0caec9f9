"""Result rows streamed into the SQLite project store: a short commit, removal in bounded chunks, upgrades.

The third red team's finding 3: a batch's rows were all held in the parent and
inserted in one transaction at its end (one 32 MiB commit held the write lock
for 2.3 s). Now each call's rows are staged as they arrive, the commit only
adds the batch row that makes them seen, and the rows of a batch that never
commits go in bounded chunks. That rows are unseen until their batch commits
holds for every store: ``test_store.py``.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from executor.data.sqlite import ProjectDatabase, rows, schema
from executor.data.store import BatchCommit, TaskStart
from executor.errors import ProjectDatabaseError

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

PROJECT = "oncology"
HASH = "hash-1"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def start(task_id: str, *, total: int = 2, owner: str = "") -> TaskStart:
    return TaskStart(
        task_id=task_id,
        task_hash=HASH,
        project=PROJECT,
        modeller="alice",
        datasource="scans",
        bundle_sha256="ab" * 32,
        policy={},
        runtime="runc",
        started_at=T0,
        selection={},
        total_batches=total,
        test_run=False,
        owner=owner,
    )


def commit(task_id: str, batch: int, *, total: int = 2, ok: bool = True) -> BatchCommit:
    return BatchCommit(
        task_id=task_id,
        project=PROJECT,
        task_hash=HASH,
        batch=batch,
        total_batches=total,
        processed=[],
        failed=[],
        record_processed=ok,
        ok=ok,
        started_at=T0,
        ended_at=T0 + timedelta(seconds=1),
        stats={},
    )


def texts(*rows: dict) -> list[str]:
    return [json.dumps(row) for row in rows]


def stored(path: Path, sql: str = "SELECT count(*) FROM results") -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute(sql).fetchone()[0])
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "pod.db"


@pytest.fixture
def db(db_path: Path) -> ProjectDatabase:
    return ProjectDatabase(db_path)


@contextmanager
def deletes_per_transaction(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """The rows each write transaction of discard_rows deleted."""
    counts: list[int] = []
    real = ProjectDatabase._transaction

    @contextmanager
    def counted(self: ProjectDatabase, doing: str, **kw: object) -> Iterator[sqlite3.Connection]:
        with real(self, doing, **kw) as conn:  # type: ignore[arg-type]
            before = conn.total_changes
            yield conn
            if doing.startswith("remove uncommitted"):
                counts.append(conn.total_changes - before)

    monkeypatch.setattr(ProjectDatabase, "_transaction", counted)
    yield counts


def test_rows_are_removed_in_chunks_of_at_most_1000_rows(db: ProjectDatabase, monkeypatch) -> None:
    db.start_task(start("t1"))
    for n in range(3):
        db.stage_rows("t1", 1, texts(*({"call": n, "i": i} for i in range(1000))))
    db.stage_rows("t1", 1, texts({"last": 1}))
    with deletes_per_transaction(monkeypatch) as counts:
        assert db.discard_rows("t1", 1) == 3001
    assert counts == [1000, 1000, 1000, 1, 0]


def test_rows_are_removed_in_chunks_of_at_most_a_mib(db: ProjectDatabase, monkeypatch) -> None:
    db.start_task(start("t1"))
    big = json.dumps({"pad": "x" * (60 * 1024)})
    for _ in range(3):
        db.stage_rows("t1", 1, [big] * 16)  # each call just under 1 MiB
    with deletes_per_transaction(monkeypatch) as counts:
        assert db.discard_rows("t1") == 48
    assert counts[-1] == 0
    assert all(n * len(big) <= rows.DISCARD_CHUNK_BYTES for n in counts)
    assert sum(counts) == 48
    assert len(counts) == 4


def wal_bytes(path: Path) -> int:
    try:
        return os.path.getsize(f"{path}-wal")
    except FileNotFoundError:
        return 0


def test_the_commit_does_not_rewrite_the_rows(db: ProjectDatabase, db_path: Path) -> None:
    # What makes the commit short whatever the batch holds: it writes the batch
    # row and the ledger's count, never the staged rows (4 MiB here). Made to
    # fail by flipping a flag on each row in commit_batch (the WAL then grows
    # by about the rows' size).
    db.start_task(start("t1"))
    row = json.dumps({"pad": "y" * 1000})
    for _ in range(4):
        db.stage_rows("t1", 1, [row] * 1000)
    reader = sqlite3.connect(db_path)  # keeps the WAL file in place across the commit
    try:
        reader.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert wal_bytes(db_path) == 0
        db.commit_batch(commit("t1", 1))
        grew = wal_bytes(db_path)
    finally:
        reader.close()
    assert 0 < grew < 256 * 1024, f"the commit wrote {grew} bytes"
    assert len(db.results(PROJECT)) == 4000


def test_a_staging_write_locked_out_past_its_timeout_writes_nothing(
    db: ProjectDatabase, db_path: Path
) -> None:
    db.start_task(start("t1"))
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(ProjectDatabaseError) as info:
            db.stage_rows("t1", 1, texts({"n": 1}), timeout_s=0.1)
        assert str(info.value) == f"project database {db_path} is locked by another process (waited 0.1 s)"
    finally:
        holder.close()
    assert stored(db_path) == 0
    db.stage_rows("t1", 1, texts({"n": 1}))
    assert stored(db_path) == 1


def make_version_3(path: Path) -> None:
    """A database as the version-3 code left it: rows committed with their batch in one transaction."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        for script in schema.MIGRATIONS[:3]:
            conn.executescript(script)
        conn.execute(
            "INSERT INTO tasks (task_id, task_hash, project, modeller, datasource, bundle_sha256,"
            " policy_json, runtime, status, started_at, total_batches, batches_done, owner)"
            " VALUES ('v3', ?, ?, 'alice', 'scans', 'cd', '{}', 'runc', 'ERROR',"
            " '2025-01-01T00:00:00.000000+00:00', 2, 1, 'x')",
            (HASH, PROJECT),
        )
        conn.execute(
            "INSERT INTO batches VALUES ('v3', 1, ?, ?, 2, 1, 1, 0, 2, '2025-01-01T00:00:00+00:00',"
            " '2025-01-01T00:00:01+00:00', '{}')",
            (PROJECT, HASH),
        )
        for n in (1, 2):
            conn.execute(
                "INSERT INTO results (project, task_hash, task_id, batch, row_json, created_at)"
                " VALUES (?, ?, 'v3', 1, ?, '2025-01-01T00:00:01+00:00')",
                (PROJECT, HASH, json.dumps({"v3": n})),
            )
        conn.execute("PRAGMA user_version = 3")
    finally:
        conn.close()


def test_a_version_3_database_upgrades_with_its_rows_still_seen(db_path: Path) -> None:
    make_version_3(db_path)
    db = ProjectDatabase(db_path)
    assert stored(db_path, "PRAGMA user_version") == schema.SCHEMA_VERSION
    assert [(r.task_id, r.batch, r.row) for r in db.results(PROJECT)] == [
        ("v3", 1, {"v3": 1}),
        ("v3", 1, {"v3": 2}),
    ]
    assert db.discard_rows("v3") == 0, "rows from before the upgrade were removed"
    # And streams from here on.
    db.start_task(start("new", total=1))
    db.stage_rows("new", 1, texts({"new": 1}))
    assert len(db.results(PROJECT)) == 2
    db.commit_batch(commit("new", 1, total=1))
    assert [r.row for r in db.results(PROJECT, task_id="new")] == [{"new": 1}]
