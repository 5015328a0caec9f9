"""The data lifecycle, owned by the parent: database, selection, views, batches, hooks, logs.

Real Docker, real SQLite: a protocol over a folder of CSV files, some
malformed, run the way an operator runs it (the CLI) and the way an
orchestrator does (the Python API).
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import pytest

from executor.backends import LABEL_TASK
from executor.data.sqlite import ProjectDatabase
from executor.errors import ProjectDatabaseError
from executor.hooks import AlgorithmProgress, Event, TaskEnded, TaskStarted
from executor.outcome import Status
from executor.spec import TaskFlags, TaskSpec

from ..conftest import PROTOCOLS, REPO, run_cli

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.integration

CSV = PROTOCOLS / "csv_stats"
GOOD = "id,value\n1,10\n2,32\n"


def _datasource(root: Path, good: list[str], bad: dict[str, str]) -> Path:
    """A folder the sandbox user can read: well-formed CSVs and malformed ones."""
    root.mkdir(exist_ok=True)
    root.chmod(0o755)
    for name in good:
        _write(root / name, GOOD)
    for name, text in bad.items():
        _write(root / name, text)
    return root


def _write(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o644)


def _run(cli_env, policy_file, data: Path, db: Path, *extra: str) -> dict[str, Any]:
    proc = run_cli(
        "run",
        "--policy",
        str(policy_file),
        str(CSV),
        "--data",
        str(data),
        "--project",
        "oncology",
        "--db",
        str(db),
        "--json",
        *extra,
        env=cli_env,
        timeout=300,
    )
    assert proc.stdout, proc.stderr
    return json.loads(proc.stdout)


def _records(cli_env, command: str, db: Path, *extra: str) -> dict[str, Any]:
    proc = run_cli(command, "--db", str(db), "--project", "oncology", "--json", *extra, env=cli_env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_results_and_failures_land_in_the_database_and_new_data_only_sees_only_new_files(
    tmp_path, cli_env, policy_file, docker_client
):
    data = _datasource(tmp_path / "clinic", ["a.csv", "b.csv"], {"broken.csv": "no header\n1,2\n"})
    db = tmp_path / "pod.db"
    first = _run(cli_env, policy_file, data, db, "--task-hash", "stats-v1")
    assert first["status"] == "OK", first
    assert first["selection"] == {
        "total": 3,
        "selected": 3,
        "skipped_processed": 0,
        "skipped_failed": 0,
        "over_limit": 0,
        "skipped_unusable": 0,
    }
    assert first["result"]["seen"] == ["a.csv", "b.csv", "broken.csv"]
    assert first["saved_rows"] == 2

    results = _records(cli_env, "results", db, "--task-hash", "stats-v1")["results"]
    assert sorted((r["row"]["file"], r["row"]["rows"], r["row"]["total"]) for r in results) == [
        ("a.csv", 2, 42),
        ("b.csv", 2, 42),
    ]
    failed = _records(cli_env, "failed-files", db)["failed_files"]
    assert [(f["name"], f["reason"], f["attempts"]) for f in failed] == [
        ("broken.csv", "missing header id,value", 1)
    ]

    # New files: only they are selected, and the old ones are not even there to read.
    _write(data / "c.csv", GOOD)
    _write(data / "d.csv", "id,value\n1,x\n")
    second = _run(
        cli_env,
        policy_file,
        data,
        db,
        "--task-hash",
        "stats-v1",
        "--new-data-only",
        "--param",
        'probe=["a.csv", "b.csv", "broken.csv", "c.csv"]',
    )
    assert second["status"] == "OK", second
    assert second["result"]["seen"] == ["c.csv", "d.csv"]
    assert second["result"]["probes"] == {
        "a.csv": "FileNotFoundError",
        "b.csv": "FileNotFoundError",
        "broken.csv": "FileNotFoundError",
        "c.csv": "read",
    }
    assert second["selection"]["skipped_processed"] == 2
    assert second["selection"]["skipped_failed"] == 1
    assert second["selection"]["selected"] == 2

    # A failed file that was fixed since is new data; one left as it was comes
    # back only when asked for.
    _write(data / "broken.csv", GOOD)
    third = _run(cli_env, policy_file, data, db, "--task-hash", "stats-v1", "--new-data-only")
    assert third["result"]["seen"] == ["broken.csv"], third
    assert third["selection"]["skipped_failed"] == 1
    fourth = _run(
        cli_env, policy_file, data, db, "--task-hash", "stats-v1", "--new-data-only", "--force-rerun-failed"
    )
    assert fourth["result"]["seen"] == ["d.csv"], fourth
    assert fourth["files"]["failed"] == {"d.csv": "row 2: 'x' is not a whole number"}
    failed = {f["name"]: f for f in _records(cli_env, "failed-files", db)["failed_files"]}
    assert set(failed) == {"d.csv"}
    assert failed["d.csv"]["attempts"] == 2

    tasks = _records(cli_env, "tasks", db)["tasks"]
    assert len(tasks) == 4
    assert {t["status"] for t in tasks} == {"OK"}
    assert {t["task_hash"] for t in tasks} == {"stats-v1"}


def test_max_files_shows_the_sandbox_exactly_that_many(tmp_path, cli_env, policy_file, docker_client):
    data = _datasource(tmp_path / "many", [f"f{i}.csv" for i in range(5)], {})
    out = _run(cli_env, policy_file, data, tmp_path / "pod.db", "--max-files", "2")
    assert out["status"] == "OK", out
    assert out["result"]["seen"] == ["f0.csv", "f1.csv"]
    assert out["selection"]["selected"] == 2
    assert out["selection"]["over_limit"] == 3


def test_a_batched_run_killed_in_its_second_batch_resumes_at_the_second_batch(
    tmp_path, cli_env, policy_file, docker_client
):
    data = _datasource(tmp_path / "batches", ["a.csv", "b.csv", "c.csv", "d.csv", "e.csv"], {})
    db = tmp_path / "pod.db"
    args = ("--task-hash", "batched", "--batch-size", "2", "--new-data-only")
    first = _run(cli_env, policy_file, data, db, *args, "--param", "die_on=c.csv")
    assert first["status"] == "KILLED", first
    assert first["batches"] == {"total": 3, "completed": 1, "size": 2}

    second = _run(cli_env, policy_file, data, db, *args)
    assert second["status"] == "OK", second
    assert second["selection"]["skipped_processed"] == 2
    assert [batch["seen"] for batch in second["result"]] == [["c.csv", "d.csv"], ["e.csv"]]
    assert second["batches"] == {"total": 2, "completed": 2, "size": 2}
    files = sorted(r["row"]["file"] for r in _records(cli_env, "results", db)["results"])
    assert files == ["a.csv", "b.csv", "c.csv", "d.csv", "e.csv"]


def test_a_batched_run_whose_parent_is_killed_resumes_at_its_batch_and_the_ledger_says_lost(
    tmp_path, cli_env, policy_file, docker_client
):
    data = _datasource(tmp_path / "batches", ["a.csv", "b.csv", "c.csv", "d.csv"], {})
    db = tmp_path / "pod.db"
    events = tmp_path / "events.jsonl"
    args = ["--task-hash", "batched", "--batch-size", "2", "--new-data-only", "--project", "oncology"]
    argv = ["run", "--policy", str(policy_file), str(CSV), "--data", str(data), "--db", str(db)]
    parent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "executor.cli",
            *argv,
            "--events",
            str(events),
            "--param",
            "hang_on=c.csv",
            *args,
        ],
        cwd=REPO,
        env=cli_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # Batch 2 is hanging once its sandbox said so.
        assert _wait_for(lambda: '"info":"hanging"' in _text(events)), _text(events)
    finally:
        parent.kill()
        parent.wait(timeout=30)
    first = ProjectDatabase(db).tasks("oncology")
    assert [(t.status, t.batches_done) for t in first] == [("RUNNING", 1)]

    second = _run(cli_env, policy_file, data, db, *args)
    assert second["status"] == "OK", second
    assert second["selection"]["skipped_processed"] == 2
    assert [batch["seen"] for batch in second["result"]] == [["c.csv", "d.csv"]]
    ledger = {t.task_id: t for t in ProjectDatabase(db).tasks("oncology")}
    assert ledger[first[0].task_id].status == "LOST"
    assert ledger[first[0].task_id].error_type == "ParentLost"
    assert ledger[second["task_id"]].status == "OK"
    files = sorted(r["row"]["file"] for r in _records(cli_env, "results", db)["results"])
    assert files == ["a.csv", "b.csv", "c.csv", "d.csv"]
    # The killed parent's sandbox went with it, or the next start reaped it.
    assert not docker_client.containers.list(all=True, filters={"label": f"{LABEL_TASK}={first[0].task_id}"})


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _wait_for(condition, timeout_s: float = 60.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_progress_events_arrive_in_order_in_the_events_file(tmp_path, cli_env, policy_file, docker_client):
    data = _datasource(tmp_path / "ev", ["a.csv"], {"bad.csv": "id,value\n1\n"})
    events = tmp_path / "events.jsonl"
    out = _run(
        cli_env, policy_file, data, tmp_path / "pod.db", "--events", str(events), "--param", "log=hello"
    )
    assert out["status"] == "OK", out
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    names = [e["event"] for e in lines]
    assert names[0] == "task_started"
    assert names[-1] == "task_ended"
    assert {e["task_id"] for e in lines} == {out["task_id"]}
    progress = [(e["kind"], e.get("current_epoch")) for e in lines if e["event"] == "algorithm_progress"]
    assert progress == [
        ("run_start", 0),
        ("epoch_start", 1),
        ("step", 1),
        ("epoch_end", 1),
        ("epoch_start", 2),
        ("step", 2),
        ("epoch_end", 2),
        ("run_end", 0),
    ]
    assert names.index("batch_run") > names.index("algorithm_progress")
    assert "results_saved" in names
    assert "failed_files_saved" in names
    logged = [e["line"] for e in lines if e["event"] == "log_line"]
    assert any("hello" in line for line in logged), logged


def test_a_raising_hook_does_not_fail_the_task_and_other_hooks_hear_everything(
    tmp_path, make_executor, docker_client
):
    data = _datasource(tmp_path / "hooks", ["a.csv"], {})
    seen: list[Event] = []

    def broken(event: Event) -> None:
        raise RuntimeError("hook bug")

    executor = make_executor(db=tmp_path / "pod.db", hooks=[broken, seen.append])
    outcome = executor.run(TaskSpec(protocol_dir=CSV, data_dir=data, project_id="oncology"))
    assert outcome.status is Status.OK, outcome.error
    assert isinstance(seen[0], TaskStarted)
    assert isinstance(seen[-1], TaskEnded)
    assert seen[-1].outcome.task_id == outcome.task_id
    assert sum(isinstance(e, AlgorithmProgress) for e in seen) == 8


def test_two_concurrent_tasks_of_one_project_both_commit(tmp_path, make_executor, docker_client):
    db = tmp_path / "pod.db"
    outcomes = {}

    def one(name: str) -> None:
        data = _datasource(tmp_path / name, [f"{name}{i}.csv" for i in range(3)], {})
        executor = make_executor(db=db)
        outcomes[name] = executor.run(
            TaskSpec(protocol_dir=CSV, data_dir=data, project_id="oncology", task_hash=name)
        )

    threads = [threading.Thread(target=one, args=(name,)) for name in ("left", "right")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {name: o.status for name, o in outcomes.items()} == {"left": Status.OK, "right": Status.OK}
    store = ProjectDatabase(db)
    assert len(store.results("oncology", "left")) == 3
    assert len(store.results("oncology", "right")) == 3
    assert {t.status for t in store.tasks("oncology")} == {"OK"}


def test_a_protocol_printing_100_mb_is_capped_and_the_task_still_ends(tmp_path, make_executor, docker_client):
    data = _datasource(tmp_path / "loud", ["a.csv"], {})
    lines: list[str] = []
    executor = make_executor(
        db=tmp_path / "pod.db", hooks=[lambda e: lines.append(e.line) if hasattr(e, "line") else None]
    )
    outcome = executor.run(
        TaskSpec(protocol_dir=CSV, data_dir=data, project_id="oncology", parameters={"flood_mb": 100})
    )
    assert outcome.status is Status.OK, outcome.error
    # init keeps 256 KiB of the stream and its last 16 KiB; the parent keeps lines of at most 4 KiB.
    assert 0 < sum(map(len, lines)) < 1024 * 1024
    (task,) = ProjectDatabase(tmp_path / "pod.db").tasks("oncology")
    assert 0 < len(task.log_tail) <= 64 * 1024


def test_a_corrupt_database_is_a_one_line_error_and_is_left_as_it_was(
    tmp_path, cli_env, policy_file, run_dir, docker_client
):
    data = _datasource(tmp_path / "c", ["a.csv"], {})
    db = tmp_path / "pod.db"
    db.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    before = db.read_bytes()
    proc = run_cli(
        "run", "--policy", str(policy_file), str(CSV), "--data", str(data), "--db", str(db), env=cli_env
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "not a usable project database" in lines[0], proc.stderr
    assert db.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("pod.db")) == ["pod.db"]
    assert list(run_dir.iterdir()) == []
    with pytest.raises(ProjectDatabaseError):
        ProjectDatabase(db)
    with pytest.raises(sqlite3.DatabaseError):
        sqlite3.connect(db).execute("select * from sqlite_master").fetchall()


def test_new_data_only_without_a_database_is_refused_before_anything_starts(tmp_path, make_executor):
    data = _datasource(tmp_path / "x", ["a.csv"], {})
    executor = make_executor()
    with pytest.raises(Exception, match="needs a project database"):
        executor.run(TaskSpec(protocol_dir=CSV, data_dir=data, flags=TaskFlags(run_on_new_data_only=True)))
