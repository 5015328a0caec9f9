"""The project database is never trusted blindly: links, other users' files, planted SQL, swaps.

Each case is refused with a one-line ProjectDatabaseError before anything is
written, and every file involved is left exactly as it was (the third red
team's finding 5: a symlink to a root-owned file became a database, another
user's 0666 database was used silently, and planted triggers ran inside the
executor's transactions).
"""

from __future__ import annotations

import os
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest

from executor.cli.commands import main
from executor.data import dbfile
from executor.data.sqlite import ProjectDatabase, database, schema
from executor.data.store import TaskEnd, TaskStart
from executor.errors import ProjectDatabaseError

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
OTHER_UID = 4242

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a file another user owns")


def start(task_id: str = "t1") -> TaskStart:
    return TaskStart(
        task_id=task_id,
        task_hash="h",
        project="p",
        modeller="alice",
        datasource="scans",
        bundle_sha256="ab" * 32,
        policy={},
        runtime="runc",
        started_at=T0,
        selection={},
        total_batches=1,
        test_run=False,
    )


def failed_end(task_id: str = "t1") -> TaskEnd:
    return TaskEnd(
        task_id=task_id,
        status="ERROR",
        error_type="ValueError",
        error_message="bad scan",
        timings={},
        ended_at=T0,
        log_tail="",
        batches_done=0,
        selection={},
    )


def snapshot(directory: Path) -> dict[str, tuple[int, int, bytes | str]]:
    """Every entry's mode, owner and bytes (or link target): what 'left as it was' compares."""
    out: dict[str, tuple[int, int, bytes | str]] = {}
    for p in sorted(directory.iterdir()):
        st = p.lstat()
        body: bytes | str = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else ""
        out[p.name] = (st.st_mode, st.st_uid, body)
    return out


def refused(path: Path, match: str) -> str:
    with pytest.raises(ProjectDatabaseError, match=match) as info:
        ProjectDatabase(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


@pytest.fixture
def pod(tmp_path: Path) -> Path:
    """A private directory (0700), as the executor makes its own."""
    d = tmp_path / "pod"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def made(pod: Path) -> Path:
    """A current database with one task, made by the executor."""
    path = pod / "pod.db"
    ProjectDatabase(path).start_task(start("t0"))
    return path


# -- links --------------------------------------------------------------------------------


def test_a_symlink_to_an_empty_file_is_refused_and_the_file_stays_empty(pod: Path, tmp_path: Path) -> None:
    # The red team's case: the link led to an empty root-owned file, which became a database.
    target = tmp_path / "etc-file"
    target.write_bytes(b"")
    os.symlink(target, pod / "pod.db")
    before = snapshot(pod), snapshot(tmp_path)
    message = refused(pod / "pod.db", "is a symbolic link, which is never followed")
    assert "fix: give the path of the file itself" in message
    assert (snapshot(pod), snapshot(tmp_path)) == before
    assert target.read_bytes() == b""


def test_a_dangling_symlink_is_refused_and_nothing_is_made_where_it_points(pod: Path, tmp_path: Path) -> None:
    target = tmp_path / "made-through-the-link.db"
    os.symlink(target, pod / "pod.db")
    refused(pod / "pod.db", "is a symbolic link")
    assert not target.exists()
    assert [p.name for p in pod.iterdir()] == ["pod.db"]


def test_a_symlink_to_a_real_database_is_refused_too(made: Path, pod: Path) -> None:
    os.symlink(made, pod / "alias.db")
    refused(pod / "alias.db", "alias.db is a symbolic link")


@pytest.mark.parametrize("suffix", ["-wal", "-shm", "-journal"])
def test_a_symlink_planted_beside_the_database_is_refused_and_not_followed(
    made: Path, pod: Path, tmp_path: Path, suffix: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"the operator's file\n")
    os.symlink(victim, f"{made}{suffix}")
    before = snapshot(pod)
    message = refused(made, f"pod.db{suffix} beside the project database is a symbolic link")
    assert f"fix: rm {made}{suffix}" in message
    assert snapshot(pod) == before
    assert victim.read_bytes() == b"the operator's file\n"


def test_a_sibling_planted_after_opening_stops_the_next_operation(made: Path, tmp_path: Path) -> None:
    db = ProjectDatabase(made)
    victim = tmp_path / "victim"
    victim.write_bytes(b"")
    os.symlink(victim, f"{made}-wal")
    with pytest.raises(
        ProjectDatabaseError, match=r"pod\.db-wal beside the project database is a symbolic link"
    ):
        db.start_task(start("t1"))
    assert victim.read_bytes() == b""
    os.unlink(f"{made}-wal")
    assert [t.task_id for t in db.tasks()] == ["t0"]


# -- owners and modes -------------------------------------------------------------------------


@as_root
def test_another_users_world_writable_database_is_refused_and_untouched(made: Path, pod: Path) -> None:
    os.chown(made, OTHER_UID, OTHER_UID)
    made.chmod(0o666)
    before = snapshot(pod)
    message = refused(made, f"is owned by uid {OTHER_UID}, not by this executor's user")
    assert f"fix: chown {os.geteuid()} {made}" in message
    assert snapshot(pod) == before


@as_root
def test_another_users_database_is_refused_even_when_private(made: Path) -> None:
    os.chown(made, OTHER_UID, OTHER_UID)
    made.chmod(0o600)
    refused(made, f"owned by uid {OTHER_UID}")


@pytest.mark.parametrize("mode", [0o660, 0o620, 0o602, 0o666])
def test_a_database_writable_by_group_or_others_is_refused(made: Path, pod: Path, mode: int) -> None:
    made.chmod(mode)
    before = snapshot(pod)
    message = refused(made, rf"is writable by group or others \(mode 0{mode:o}\)")
    assert message.endswith(f"fix: chmod go-w {made}")
    assert snapshot(pod) == before


def test_a_database_readable_by_others_is_still_used(made: Path) -> None:
    made.chmod(0o644)  # the brief's line: writing is what is refused; the operator chose to share reads
    assert [t.task_id for t in ProjectDatabase(made).tasks()] == ["t0"]


def test_a_group_writable_sibling_is_refused(made: Path) -> None:
    wal = Path(f"{made}-wal")
    wal.write_bytes(b"")
    wal.chmod(0o660)
    refused(made, r"pod\.db-wal is writable by group or others")


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_a_directory_others_may_write_is_refused_for_new_and_existing_databases(
    tmp_path: Path, mode: int
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    ProjectDatabase(shared / "old.db")
    shared.chmod(mode)
    before = snapshot(shared)
    message = refused(shared / "old.db", "directory .*shared is writable by group or others")
    sticky_fix = "keep the database in a directory only this user can write"
    assert (sticky_fix in message) == bool(mode & stat.S_ISVTX)
    refused(shared / "new.db", "is writable by group or others")
    assert snapshot(shared) == before, "the refused new database was made anyway"


@as_root
def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, OTHER_UID, OTHER_UID)
    refused(theirs / "pod.db", f"directory .*theirs is owned by uid {OTHER_UID}")
    assert list(theirs.iterdir()) == []


def test_a_new_database_is_made_without_following_links_and_private(pod: Path) -> None:
    ProjectDatabase(pod / "new.db")
    st = (pod / "new.db").lstat()
    assert stat.S_ISREG(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    with pytest.raises(FileExistsError):
        dbfile.create_exclusive(pod / "new.db")
    os.symlink(pod / "elsewhere", pod / "link")
    with pytest.raises(FileExistsError):
        dbfile.create_exclusive(pod / "link")  # O_EXCL | O_NOFOLLOW: never through a link
    assert not (pod / "elsewhere").exists()


# -- planted SQL ------------------------------------------------------------------------------

TURN_FAILED_OK = """
CREATE TRIGGER make_it_ok AFTER UPDATE OF status ON tasks WHEN NEW.status != 'OK'
BEGIN
    UPDATE tasks SET status = 'OK', error_type = NULL, error_message = NULL WHERE task_id = NEW.task_id;
END;
"""
COPY_ROWS = """
CREATE TABLE loot (row_json TEXT);
CREATE TRIGGER copy_rows AFTER INSERT ON results BEGIN INSERT INTO loot VALUES (NEW.row_json); END;
"""


def plant(path: Path, sql: str) -> None:
    conn = raw(path)
    try:
        conn.executescript(sql)
    finally:
        conn.close()


def test_the_planted_triggers_would_have_worked(made: Path) -> None:
    # The control: on a database nobody checks, the trigger turns a failed task OK.
    plant(made, TURN_FAILED_OK)
    conn = raw(made)
    try:
        conn.execute("UPDATE tasks SET status = 'ERROR' WHERE task_id = 't0'")
        assert conn.execute("SELECT status FROM tasks").fetchone() == ("OK",)
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        (TURN_FAILED_OK, 'trigger "make_it_ok" on "tasks"'),
        (COPY_ROWS, 'trigger "copy_rows" on "results"'),
        ("CREATE VIEW ok_tasks AS SELECT * FROM tasks WHERE status = 'OK'", 'view "ok_tasks"'),
        ("CREATE TABLE notes (x)", 'table "notes"'),
        ("CREATE INDEX by_row ON results (row_json)", 'index "by_row" on "results"'),
    ],
    ids=["trigger-turns-failed-ok", "trigger-copies-rows", "view", "table", "index"],
)
def test_a_planted_object_is_refused_on_opening_naming_it(
    made: Path, pod: Path, sql: str, named: str
) -> None:
    plant(made, sql)
    before = snapshot(pod)
    message = refused(made, "that its schema does not define")
    assert named in message
    assert snapshot(pod) == before


def test_a_trigger_planted_while_the_database_is_open_never_runs(made: Path) -> None:
    db = ProjectDatabase(made)
    db.start_task(start("t1"))
    plant(made, TURN_FAILED_OK + COPY_ROWS)
    with pytest.raises(ProjectDatabaseError, match='trigger "copy_rows"'):
        db.end_task(failed_end("t1"))
    with pytest.raises(ProjectDatabaseError, match="that its schema does not define"):
        db.tasks()
    conn = raw(made)
    try:
        assert conn.execute("SELECT status FROM tasks WHERE task_id = 't1'").fetchone() == ("RUNNING",)
        assert conn.execute("SELECT count(*) FROM loot").fetchone() == (0,)
    finally:
        conn.close()


def test_a_planted_name_is_quoted_on_one_line(made: Path) -> None:
    plant(made, 'CREATE VIEW "evil\nname\x1b[2J" AS SELECT 1')
    message = refused(made, "holds a view")
    assert '"evil\\nname\\u001b[2J"' in message


def test_a_missing_index_is_refused(made: Path) -> None:
    plant(made, "DROP INDEX tasks_by_start")
    refused(made, 'lacks the index "tasks_by_start"')


def test_statistics_from_analyze_are_not_a_planted_object(made: Path) -> None:
    plant(made, "ANALYZE")
    assert [t.task_id for t in ProjectDatabase(made).tasks()] == ["t0"]


def test_an_older_database_with_a_planted_trigger_is_refused_before_its_upgrade(pod: Path) -> None:
    path = pod / "v1.db"
    conn = raw(path)
    try:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(schema.MIGRATIONS[0])
        conn.execute("PRAGMA user_version = 1")
        conn.executescript(TURN_FAILED_OK)
    finally:
        conn.close()
    refused(path, 'trigger "make_it_ok"')
    assert (raw(path).execute("PRAGMA user_version").fetchone()) == (1,)


def test_every_connection_has_trusted_schema_off(made: Path) -> None:
    db = ProjectDatabase(made)
    with db._connect("test") as conn:
        assert conn.execute("PRAGMA trusted_schema").fetchone() == (0,)


# -- swaps between the check and the open -------------------------------------------------------


def swap_on_connect(monkeypatch: pytest.MonkeyPatch, swap) -> list[str]:
    """Run ``swap`` just before SQLite opens the file (after every check passed)."""
    real = sqlite3.connect
    seen: list[str] = []

    def connect(target, *args, **kwargs):
        if not seen and str(target).startswith("file:"):
            seen.append(str(target))
            swap()
        return real(target, *args, **kwargs)

    monkeypatch.setattr(database.sqlite3, "connect", connect)
    return seen


def test_a_link_swapped_in_between_check_and_open_is_caught(
    made: Path, pod: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoy = tmp_path / "decoy.db"
    ProjectDatabase(decoy)
    decoy_before = decoy.read_bytes()

    def swap() -> None:
        os.rename(made, pod / "moved.db")
        os.symlink(decoy, made)

    seen = swap_on_connect(monkeypatch, swap)
    refused(made, "was replaced while it was being opened")
    assert seen, "the swap never ran"
    assert decoy.read_bytes() == decoy_before


def test_a_file_swapped_in_between_check_and_open_is_caught(
    made: Path, pod: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = pod / "other.db"
    ProjectDatabase(other)

    def swap() -> None:
        os.rename(made, pod / "moved.db")
        os.rename(other, made)

    swap_on_connect(monkeypatch, swap)
    refused(made, "was replaced while it was being opened")


def test_a_database_replaced_after_opening_is_refused_by_the_instance_that_opened_it(
    made: Path, pod: Path
) -> None:
    db = ProjectDatabase(made)
    ProjectDatabase(pod / "other.db")
    os.rename(pod / "other.db", made)
    with pytest.raises(ProjectDatabaseError, match="is no longer the file this executor opened"):
        db.tasks()
    assert ProjectDatabase(made).tasks() == []  # opened afresh, the new file is checked and used


# -- the CLI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["results", "failed-files", "tasks"])
def test_the_read_commands_refuse_a_linked_database_with_exit_status_2(
    made: Path, pod: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    os.symlink(made, pod / "link.db")
    assert main([command, "--db", str(pod / "link.db")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "is a symbolic link, which is never followed" in err


def test_a_read_command_names_a_dangling_link_as_a_link(
    pod: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    os.symlink(pod / "nowhere.db", pod / "link.db")
    assert main(["results", "--db", str(pod / "link.db")]) == 2
    assert "is a symbolic link" in capsys.readouterr().err
    assert not (pod / "nowhere.db").exists()


def test_run_refuses_a_planted_database_with_exit_status_2_before_anything_runs(
    made: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plant(made, TURN_FAILED_OK)
    before = made.read_bytes()
    protocol = tmp_path / "proto"
    protocol.mkdir()
    (protocol / "protocol.py").write_text("def run(ctx):\n    return 1\n")
    data = tmp_path / "data"
    data.mkdir()
    assert main(["run", str(protocol), "--data", str(data), "--db", str(made)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert 'trigger "make_it_ok"' in err
    assert made.read_bytes() == before
