"""The read commands: one JSON object with --json, plain-text tables otherwise, hostile text escaped."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

import pytest

from executor.cli.records import failed_files_command, results_command, tasks_command
from executor.data.scan import FileStamp
from executor.data.sqlite import ProjectDatabase
from executor.data.store import BatchCommit, TaskEnd, TaskStart
from executor.errors import ProjectDatabaseError

if TYPE_CHECKING:
    from pathlib import Path

PROJECT = "oncology"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
HOSTILE = "\x1b[2J[bold red]pwned[/]\u202e"


def start(task_id: str, *, project: str = PROJECT, task_hash: str = "h1", minute: int = 0) -> TaskStart:
    return TaskStart(
        task_id=task_id,
        task_hash=task_hash,
        project=project,
        modeller="alice",
        datasource="scans",
        bundle_sha256="ab" * 32,
        policy={"runtime": "runsc"},
        runtime="runsc",
        started_at=T0 + timedelta(minutes=minute),
        selection={"total": 4, "selected": 3},
        total_batches=1,
        test_run=False,
    )


def save(db: ProjectDatabase, task_id: str, *, task_hash: str = "h1", rows=(), failed=()) -> None:
    """Stage a batch's rows, as the executor does while it runs, then commit it."""
    if rows:
        db.stage_rows(task_id, 1, [json.dumps(row) for row in rows])
    db.commit_batch(
        BatchCommit(
            task_id=task_id,
            project=PROJECT,
            task_hash=task_hash,
            batch=1,
            total_batches=1,
            processed=[],
            failed=[(FileStamp(name, 1, 1), reason) for name, reason in failed],
            record_processed=True,
            started_at=T0,
            ended_at=T0 + timedelta(seconds=3),
            stats={},
        )
    )


@pytest.fixture
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wide console, so that no table cell is folded across lines."""
    monkeypatch.setenv("COLUMNS", "250")


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A database with two task hashes' rows, failed files and ledger rows, one task still running."""
    path = tmp_path / "pod.db"
    db = ProjectDatabase(path)
    db.start_task(start("t1"))
    save(
        db,
        "t1",
        rows=[{"file": "a.csv", "mean": 1.5}, {"file": "b.csv", "mean": None}],
        failed=[("c.csv", "bad header")],
    )
    db.end_task(
        TaskEnd(
            task_id="t1",
            status="OK",
            error_type=None,
            error_message=None,
            timings={"total": 3.0},
            ended_at=T0 + timedelta(seconds=3),
            log_tail="hello\n",
            batches_done=1,
            selection={"total": 4, "selected": 3},
        )
    )
    db.start_task(start("t2", task_hash="h2", minute=1))
    save(db, "t2", task_hash="h2", rows=[{"file": "d.csv", "mean": 2}])
    db.start_task(start("t3", project="cardiology", minute=2))
    return path


def one_json_object(out: str) -> dict:
    document = json.loads(out)  # raises if stdout holds anything else
    assert isinstance(document, dict)
    return document


def strings(value: object) -> list[str]:
    """Every string in a decoded JSON document."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in strings(v)]
    return []


def test_results_json_is_one_object_with_every_row_in_order(db_path: Path, capsys) -> None:
    assert results_command(db_path, PROJECT, None, True) == 0
    document = one_json_object(capsys.readouterr().out)
    assert document["project"] == PROJECT
    assert document["task_hash"] is None
    assert [(r["task_id"], r["task_hash"], r["batch"], r["row"]) for r in document["results"]] == [
        ("t1", "h1", 1, {"file": "a.csv", "mean": 1.5}),
        ("t1", "h1", 1, {"file": "b.csv", "mean": None}),
        ("t2", "h2", 1, {"file": "d.csv", "mean": 2}),
    ]
    assert all(datetime.fromisoformat(r["created_at"]).tzinfo is not None for r in document["results"])


def test_results_json_of_one_task_hash(db_path: Path, capsys) -> None:
    results_command(db_path, PROJECT, "h2", True)
    document = one_json_object(capsys.readouterr().out)
    assert document["task_hash"] == "h2"
    assert [r["row"] for r in document["results"]] == [{"file": "d.csv", "mean": 2}]


def test_results_table_has_a_column_per_row_key(db_path: Path, capsys, wide) -> None:
    assert results_command(db_path, PROJECT, "h1", False) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "batch" in line)
    assert "file" in header
    assert "mean" in header
    lines = [line for line in out.splitlines() if "a.csv" in line or "b.csv" in line]
    assert len(lines) == 2
    assert "1.5" in lines[0]
    assert "d.csv" not in out
    assert "2 row(s)" in out


def test_rows_with_too_many_keys_show_as_json(tmp_path: Path, capsys, wide) -> None:
    path = tmp_path / "pod.db"
    db = ProjectDatabase(path)
    db.start_task(start("t1"))
    save(db, "t1", rows=[{f"k{i}": i for i in range(12)}])
    results_command(path, PROJECT, None, False)
    out = capsys.readouterr().out
    assert '"k0": 0' in out
    assert '"k11": 11' in out


def test_failed_files_json_and_table(db_path: Path, capsys, wide) -> None:
    assert failed_files_command(db_path, PROJECT, None, True) == 0
    document = one_json_object(capsys.readouterr().out)
    (failed,) = document["failed_files"]
    assert {k: failed[k] for k in ("task_hash", "name", "reason", "attempts", "last_task_id")} == {
        "task_hash": "h1",
        "name": "c.csv",
        "reason": "bad header",
        "attempts": 1,
        "last_task_id": "t1",
    }
    assert datetime.fromisoformat(failed["updated_at"]).tzinfo is not None

    assert failed_files_command(db_path, PROJECT, None, False) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "c.csv" in line)
    assert "bad header" in row
    assert "t1" in row


def test_tasks_json_is_the_ledger_newest_first(db_path: Path, capsys) -> None:
    assert tasks_command(db_path, None, True) == 0
    document = one_json_object(capsys.readouterr().out)
    assert document["project"] is None
    assert [t["task_id"] for t in document["tasks"]] == ["t3", "t2", "t1"]
    t1 = document["tasks"][2]
    assert (t1["status"], t1["log_tail"], t1["batches_done"], t1["timings"]) == (
        "OK",
        "hello\n",
        1,
        {"total": 3.0},
    )
    assert datetime.fromisoformat(t1["ended_at"]) == T0 + timedelta(seconds=3)
    assert document["tasks"][0]["ended_at"] is None

    tasks_command(db_path, PROJECT, True)
    assert [t["task_id"] for t in one_json_object(capsys.readouterr().out)["tasks"]] == ["t2", "t1"]


def test_tasks_json_lists_a_marked_tail_s_lines_and_leaves_an_unmarked_one_s_stream_unknown(
    tmp_path: Path, capsys
) -> None:
    # A row written before lines were marked (log_format 0) may hold a forged
    # note: it is never shown as the executor's.
    path = tmp_path / "pod.db"
    db = ProjectDatabase(path)
    marked = (
        "executor| --- batch 1 ---\n"
        "stdout| [executor: output cap reached]\n"
        "executor| --- batch 2 ---\n"
        "stderr| oops\n"
        "executor| [executor: 3 lines dropped over the output cap]\n"
    )
    for task_id, tail, log_format, minute in (("old", "[executor: forged]\n", 0, 0), ("new", marked, 1, 1)):
        db.start_task(start(task_id, minute=minute))
        db.end_task(
            TaskEnd(
                task_id=task_id,
                status="OK",
                error_type=None,
                error_message=None,
                timings={},
                ended_at=T0 + timedelta(minutes=minute, seconds=1),
                log_tail=tail,
                batches_done=1,
                selection={},
                log_format=log_format,
            )
        )
    assert tasks_command(path, PROJECT, True) == 0
    new, old = one_json_object(capsys.readouterr().out)["tasks"]
    assert (new["log_format"], new["log_tail"]) == (1, marked)
    assert new["log_lines"] == [
        {"stream": "stdout", "batch": 1, "line": "[executor: output cap reached]"},
        {"stream": "stderr", "batch": 2, "line": "oops"},
        {"stream": "executor", "batch": 2, "line": "[executor: 3 lines dropped over the output cap]"},
    ]
    assert (old["log_format"], old["log_tail"]) == (0, "[executor: forged]\n")
    assert old["log_lines"] == [{"stream": None, "batch": None, "line": "[executor: forged]"}]


def test_tasks_table(db_path: Path, capsys, wide) -> None:
    assert tasks_command(db_path, PROJECT, False) == 0
    lines = capsys.readouterr().out.splitlines()
    t1 = next(line for line in lines if " t1 " in line)
    t2 = next(line for line in lines if " t2 " in line)
    assert "OK" in t1
    assert "3 of 4" in t1
    assert "RUNNING" in t2
    assert lines.index(t2) < lines.index(t1)
    assert not any("cardiology" in line for line in lines)


def test_text_from_the_database_is_escaped_never_markup(tmp_path: Path, capsys, wide) -> None:
    path = tmp_path / "pod.db"
    db = ProjectDatabase(path)
    db.start_task(start("t1"))
    save(db, "t1", rows=[{"note": HOSTILE}], failed=[("evil.csv", HOSTILE)])
    db.end_task(
        TaskEnd(
            task_id="t1",
            status="ERROR",
            error_type="E",
            error_message=HOSTILE,
            timings={},
            ended_at=T0,
            log_tail="",
            batches_done=1,
            selection={},
        )
    )
    for command in (
        lambda: results_command(path, PROJECT, None, False),
        lambda: failed_files_command(path, PROJECT, None, False),
        lambda: tasks_command(path, PROJECT, False),
    ):
        command()
        out = capsys.readouterr().out
        assert "\x1b" not in out
        assert "\u202e" not in out
        assert "\\x1b[2J[bold red]pwned[/]\\u202e" in out
    for command in (
        lambda: results_command(path, PROJECT, None, True),
        lambda: failed_files_command(path, PROJECT, None, True),
        lambda: tasks_command(path, PROJECT, True),
    ):
        command()
        out = capsys.readouterr().out
        assert out.isascii()
        # The data itself is intact, only encoded.
        assert HOSTILE in strings(one_json_object(out))


def test_an_empty_project_says_so(db_path: Path, capsys) -> None:
    results_command(db_path, "nobody", None, False)
    failed_files_command(db_path, "nobody", None, False)
    tasks_command(db_path, "nobody", False)
    out = capsys.readouterr().out
    assert "no results in project nobody" in out
    assert "no failed files in project nobody" in out
    assert "no tasks in project nobody" in out
    results_command(db_path, "nobody", None, True)
    assert one_json_object(capsys.readouterr().out)["results"] == []


@pytest.mark.parametrize(
    "command",
    [
        lambda path: results_command(path, PROJECT, None, True),
        lambda path: failed_files_command(path, PROJECT, None, False),
        lambda path: tasks_command(path, None, True),
    ],
    ids=["results", "failed-files", "tasks"],
)
def test_a_missing_database_is_an_error_and_is_not_made(tmp_path: Path, capsys, command) -> None:
    path = tmp_path / "state" / "pod.db"
    with pytest.raises(ProjectDatabaseError, match=f"no project database at {path}"):
        command(path)
    assert not (tmp_path / "state").exists()
    assert capsys.readouterr().out == ""
