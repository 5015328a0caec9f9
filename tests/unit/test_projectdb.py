"""The SQLite store's own file: schema, upgrades, one-transaction batches, locks, processes, refusals."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest

from executor import paths
from executor.data.sqlite import ProjectDatabase, schema
from executor.data.sqlite.schema import SCHEMA_VERSION
from executor.errors import ProjectDatabaseError
from tests.storecases import HASH, PROJECT, commit, save, stamp, start


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file in ``directory`` and its bytes: what 'nothing was written' compares."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


def scalar(path: Path, sql: str, params: tuple = ()) -> object:
    conn = raw(path)
    try:
        return conn.execute(sql, params).fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "pod.db"


@pytest.fixture
def db(db_path: Path) -> ProjectDatabase:
    return ProjectDatabase(db_path)


# -- creating and opening --------------------------------------------------------------


def test_a_new_database_is_private_in_wal_mode_at_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "state" / "deeper" / "pod.db"
    ProjectDatabase(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for directory in (tmp_path / "state", tmp_path / "state" / "deeper"):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert scalar(path, "PRAGMA user_version") == SCHEMA_VERSION
    assert scalar(path, "PRAGMA journal_mode") == "wal"
    tables = {row for (row,) in raw(path).execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"tasks", "processed_files", "failed_files", "results", "batches"} <= tables


def test_reopening_a_current_database_writes_nothing(db: ProjectDatabase, db_path: Path) -> None:
    db.start_task(start("t1"))
    before = snapshot(db_path.parent)
    ProjectDatabase(db_path)
    assert snapshot(db_path.parent) == before


def test_reads_leave_no_wal_or_shm_files(db: ProjectDatabase, db_path: Path) -> None:
    db.start_task(start("t1"))
    db.results(PROJECT)
    db.tasks()
    assert sorted(p.name for p in db_path.parent.iterdir()) == ["pod.db"]


# -- batches (the store contract itself is held by test_store.py) ---------------------------


def test_each_committed_batch_has_a_batch_row_with_its_counts_and_statistics(
    db: ProjectDatabase, db_path: Path
) -> None:
    db.start_task(start("t1", total_batches=3))
    save(
        db,
        "t1",
        1,
        total=3,
        rows=[{"file": "a.csv", "mean": 1.5}, {"file": "b.csv", "mean": None}],
        processed=[stamp("a.csv", 10, 100), stamp("b.csv", 20, 200)],
        failed=[(stamp("c.csv"), "malformed header")],
        stats={"files": 3, "duration_s": 0.5},
    )
    save(db, "t1", 2, total=3, rows=[{"file": "d.csv", "mean": 2}], processed=[stamp("d.csv")])
    # A batch that did not end OK has none.
    db.commit_batch(
        commit("t1", 3, total=3, failed=[(stamp("e.csv"), "crashed")], record_processed=False, ok=False)
    )
    conn = raw(db_path)
    try:
        batch_rows = conn.execute(
            "SELECT batch, total_batches, files, processed, failed, rows, stats_json"
            " FROM batches ORDER BY batch"
        ).fetchall()
    finally:
        conn.close()
    assert batch_rows == [
        (1, 3, 3, 2, 1, 2, '{"duration_s":0.5,"files":3}'),
        (2, 3, 1, 1, 0, 1, '{"files":0}'),
    ]


def test_a_commit_that_fails_mid_way_stores_nothing_of_the_batch(db: ProjectDatabase) -> None:
    db.start_task(start("t1"))
    save(db, "t1", 1, rows=[{"n": 1}], processed=[stamp("a.csv")])
    before = (db.results(PROJECT), db.file_states(PROJECT, HASH), db.tasks())
    # Its files are written before the batch row, which then collides with
    # the batch already committed.
    again = commit("t1", 1, processed=[stamp("b.csv")], failed=[(stamp("a.csv"), "late failure")])
    with pytest.raises(ProjectDatabaseError, match=r"cannot commit batch 1 of task t1 .*UNIQUE constraint"):
        db.commit_batch(again)
    assert (db.results(PROJECT), db.file_states(PROJECT, HASH), db.tasks()) == before


def test_a_commit_for_a_task_never_started_is_refused(db: ProjectDatabase) -> None:
    with pytest.raises(ProjectDatabaseError, match="FOREIGN KEY"):
        save(db, "ghost", 1, processed=[stamp("a.csv")])
    with pytest.raises(ProjectDatabaseError, match="task ghost is not running"):
        db.stage_rows("ghost", 1, ['{"n": 1}'])
    assert db.results(PROJECT) == []
    assert db.file_states(PROJECT, HASH).processed == {}


# -- concurrency --------------------------------------------------------------------------

BATCHES = 25
ROWS = 3


def write_task(path: str, task_id: str) -> None:
    """One task's writer: opens the database itself and commits every batch (run in threads and processes)."""
    db = ProjectDatabase(Path(path), busy_timeout_s=60)
    db.start_task(start(task_id, total_batches=BATCHES))
    for b in range(1, BATCHES + 1):
        save(
            db,
            task_id,
            b,
            total=BATCHES,
            rows=[{"task": task_id, "batch": b, "i": i} for i in range(ROWS)],
            processed=[stamp(f"{task_id}/{b}-{k}.csv") for k in range(2)] + [stamp("shared.csv", b, b)],
        )


def test_writers_in_processes_and_threads_at_once_lose_nothing(db_path: Path) -> None:
    # Nobody has made the file yet: creating it races too.
    spawn = multiprocessing.get_context("spawn")
    proc_ids = ["proc-0", "proc-1"]
    thread_ids = ["thread-0", "thread-1", "thread-2"]
    procs = [spawn.Process(target=write_task, args=(str(db_path), task_id)) for task_id in proc_ids]
    errors: list[BaseException] = []

    def in_thread(task_id: str) -> None:
        try:
            write_task(str(db_path), task_id)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=in_thread, args=(task_id,)) for task_id in thread_ids]
    try:
        for p in procs:
            p.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=240)
        for p in procs:
            p.join(timeout=240)
        assert errors == []
        assert [p.exitcode for p in procs] == [0, 0]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()

    db = ProjectDatabase(db_path)
    writers = proc_ids + thread_ids
    results = db.results(PROJECT)
    assert len(results) == len(writers) * BATCHES * ROWS
    assert {(r.row["task"], r.row["batch"], r.row["i"]) for r in results} == {
        (w, b, i) for w in writers for b in range(1, BATCHES + 1) for i in range(ROWS)
    }
    for w in writers:
        assert [r.batch for r in results if r.task_id == w] == sorted(
            r.batch for r in results if r.task_id == w
        )
    assert {t.task_id: t.batches_done for t in db.tasks()} == dict.fromkeys(writers, BATCHES)
    processed = db.file_states(PROJECT, HASH).processed
    assert len(processed) == len(writers) * BATCHES * 2 + 1
    assert processed["shared.csv"][0] in range(1, BATCHES + 1)
    assert scalar(db_path, "SELECT count(*) FROM batches") == len(writers) * BATCHES


# -- upgrades and refusals ------------------------------------------------------------------


def make_version_1(path: Path) -> None:
    """A database exactly as the version-1 code left it, with some history."""
    conn = raw(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(schema.MIGRATIONS[0])
        conn.execute(
            "INSERT INTO tasks (task_id, task_hash, project, modeller, datasource, bundle_sha256,"
            " policy_json, runtime, status, timings_json, selection_json, test_run, started_at, ended_at)"
            " VALUES ('v1-ok', 'h', 'p', 'alice', 'scans', 'cd', '{\"runtime\":\"runc\"}', 'runc', 'OK',"
            " '{\"total\":2.0}', '{\"total\":2}', 0, '2024-01-01T00:00:00.000000+00:00',"
            " '2024-01-01T00:01:00.000000+00:00')"
        )
        conn.execute(
            "INSERT INTO tasks (task_id, task_hash, project, modeller, datasource, bundle_sha256,"
            " policy_json, runtime, status, error_type, error_message, test_run, started_at, ended_at)"
            " VALUES ('v1-err', 'h', 'p', 'alice', 'scans', 'cd', '{}', 'runc', 'ERROR', 'E', 'boom', 0,"
            " '2024-01-02T00:00:00.000000+00:00', '2024-01-02T00:01:00.000000+00:00')"
        )
        conn.execute(
            "INSERT INTO processed_files VALUES"
            " ('p', 'h', 'a.csv', 5, 50, 'v1-ok', '2024-01-01T00:01:00+00:00')"
        )
        conn.execute(
            "INSERT INTO failed_files VALUES ('p', 'h', 'b.csv', 'bad', 2, 6, 60, 'v1-err',"
            " '2024-01-02T00:01:00+00:00')"
        )
        conn.execute(
            "INSERT INTO results (project, task_hash, task_id, row_json, created_at)"
            " VALUES ('p', 'h', 'v1-ok', '{\"x\":1}', '2024-01-01T00:01:00+00:00')"
        )
        conn.execute("PRAGMA user_version = 1")
    finally:
        conn.close()


def columns(path: Path, table: str) -> set[str]:
    conn = raw(path)
    try:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
    finally:
        conn.close()


def test_a_version_1_database_is_upgraded_keeping_its_data(db_path: Path) -> None:
    make_version_1(db_path)
    db = ProjectDatabase(db_path)
    assert scalar(db_path, "PRAGMA user_version") == SCHEMA_VERSION
    assert "owner" in columns(db_path, "tasks")  # version 3, on top of 2
    assert {"pending", "size"} <= columns(db_path, "results")  # streamed result rows
    by_id = {t.task_id: t for t in db.tasks("p")}
    assert (by_id["v1-ok"].total_batches, by_id["v1-ok"].batches_done, by_id["v1-ok"].log_tail) == (1, 1, "")
    assert by_id["v1-ok"].log_format == 0  # version 4: older tails are unmarked
    assert by_id["v1-ok"].timings == {"total": 2.0}
    assert by_id["v1-ok"].policy == {"runtime": "runc"}
    assert (by_id["v1-err"].batches_done, by_id["v1-err"].error_message) == (0, "boom")
    assert [(r.task_id, r.batch, r.row) for r in db.results("p")] == [("v1-ok", 1, {"x": 1})]
    states = db.file_states("p", "h")
    assert states.processed == {"a.csv": (5, 50)}
    assert states.failed == {"b.csv": ("bad", 2)}
    # And it works as a current database from here on.
    db.start_task(start("v2", project="p", task_hash="h", total_batches=1))
    save(
        db, "v2", 1, total=1, task_hash="h", project="p", rows=[{"x": 2}], failed=[(stamp("b.csv"), "worse")]
    )
    assert db.file_states("p", "h").failed == {"b.csv": ("worse", 3)}
    assert [r.row for r in db.results("p", "h")] == [{"x": 1}, {"x": 2}]


def test_an_upgrade_that_fails_leaves_the_version_1_database_as_it_was(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_version_1(db_path)
    # Version 2 breaks on its last statement, after its tables and columns were made.
    broken = (schema.MIGRATIONS[0], schema.MIGRATIONS[1] + "CREATE TABLE tasks (x);")
    monkeypatch.setattr(schema, "MIGRATIONS", broken)
    with pytest.raises(ProjectDatabaseError, match=r"cannot upgrade .*already exists"):
        ProjectDatabase(db_path)
    assert scalar(db_path, "PRAGMA user_version") == 1
    assert "log_tail" not in columns(db_path, "tasks")
    assert "batch" not in columns(db_path, "results")
    assert scalar(db_path, "SELECT count(*) FROM sqlite_master WHERE name = 'batches'") == 0
    assert scalar(db_path, "SELECT count(*) FROM tasks") == 2
    monkeypatch.undo()
    assert len(ProjectDatabase(db_path).tasks()) == 2


def test_a_newer_schema_is_refused_naming_both_versions_and_left_untouched(db_path: Path) -> None:
    ProjectDatabase(db_path).start_task(start("t1"))
    conn = raw(db_path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    conn.close()
    before = snapshot(db_path.parent)
    with pytest.raises(ProjectDatabaseError) as info:
        ProjectDatabase(db_path)
    message = str(info.value)
    assert f"schema version {SCHEMA_VERSION + 5}" in message
    assert f"version {SCHEMA_VERSION} that this sandbox-executor knows" in message
    assert "\n" not in message
    assert snapshot(db_path.parent) == before


def _not_a_database(path: Path) -> None:
    path.write_text("name,value\nthis is a csv file, not a database\n" * 100)


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _mangled_page(path: Path) -> None:
    """The results table's root page, its cell pointers overwritten: a valid header, a broken tree."""
    root = scalar(path, "SELECT rootpage FROM sqlite_master WHERE name = 'results'")
    data = bytearray(path.read_bytes())
    size = int.from_bytes(data[16:18], "big")
    start = (root - 1) * size
    data[start + 12 : start + 412] = b"\xff" * 400
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_not_a_database, _truncated, _mangled_page])
def test_a_file_that_is_not_a_usable_database_is_refused_and_untouched(db_path: Path, damage) -> None:
    db = ProjectDatabase(db_path)
    db.start_task(start("t1", total_batches=1))
    save(db, "t1", 1, total=1, rows=[{"n": i, "pad": "x" * 200} for i in range(2000)])
    damage(db_path)
    before = snapshot(db_path.parent)
    with pytest.raises(ProjectDatabaseError, match=r"pod\.db is not a usable project database: ") as info:
        ProjectDatabase(db_path)
    assert "\n" not in str(info.value)
    assert snapshot(db_path.parent) == before


def test_a_directory_in_place_of_the_database_is_refused(db_path: Path) -> None:
    db_path.mkdir()
    with pytest.raises(ProjectDatabaseError, match="not a usable project database: it is a directory"):
        ProjectDatabase(db_path)


def test_a_database_locked_too_long_gives_a_one_line_error(db: ProjectDatabase, db_path: Path) -> None:
    slow = ProjectDatabase(db_path, busy_timeout_s=0.1)
    holder = raw(db_path)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(ProjectDatabaseError) as info:
            slow.start_task(start("t1"))
        assert str(info.value) == f"project database {db_path} is locked by another process (waited 0.1 s)"
        # Readers are not blocked by a writer.
        assert slow.tasks() == []
    finally:
        holder.close()
    slow.start_task(start("t1"))
    assert [t.task_id for t in db.tasks()] == ["t1"]


def test_an_upgrade_waiting_too_long_for_the_lock_changes_nothing(db_path: Path) -> None:
    make_version_1(db_path)
    holder = raw(db_path)
    try:
        holder.execute("BEGIN IMMEDIATE")
        with pytest.raises(ProjectDatabaseError, match="is locked by another process"):
            ProjectDatabase(db_path, busy_timeout_s=0.1)
    finally:
        holder.close()
    assert scalar(db_path, "PRAGMA user_version") == 1


def test_a_path_that_cannot_be_made_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ProjectDatabaseError, match=r"cannot create project database .*a-file/pod\.db"):
        ProjectDatabase(blocker / "pod.db")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory")
def test_an_unwritable_directory_is_refused(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(ProjectDatabaseError, match="cannot create project database"):
            ProjectDatabase(locked / "pod.db")
    finally:
        locked.chmod(0o700)


# -- default path ---------------------------------------------------------------------------


def test_default_path_prefers_the_state_dir_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SANDBOX_EXECUTOR_STATE_DIR", str(tmp_path))
    assert paths.db_path() == tmp_path / "projects.sqlite"


def test_default_path_for_root_is_under_var_lib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDBOX_EXECUTOR_STATE_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert paths.db_path() == Path("/var/lib/sandbox-executor/projects.sqlite")


def test_default_path_for_a_user_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SANDBOX_EXECUTOR_STATE_DIR", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert paths.db_path() == tmp_path / "state" / "sandbox-executor" / "projects.sqlite"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert paths.db_path() == tmp_path / "home" / ".local" / "state" / "sandbox-executor" / "projects.sqlite"
