"""The project store contract, held by every registered store: the same tests over SQLite and memory.

What the executor relies on from a store (:class:`executor.data.store.ProjectStore`):
the ledger's rows open RUNNING, close as they ended or as LOST, keep the log
tail's last whole lines and list newest first; result rows staged for a batch
stay unseen until it commits and go when it never does; file outcomes follow
each batch per task hash; every refusal changes nothing. What only the SQLite
file can show (its safety, schema upgrades, locks, processes) is in
``test_projectdb*.py``; opening a store from a URL, and an executor running
through each kind, in ``test_open_store.py``.
"""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

import pytest

from executor.data.store import MAX_LOG_TAIL_CHARS, ProjectStore
from executor.data.stores import open_store
from executor.errors import ProjectDatabaseError
from tests.storecases import HASH, PROJECT, T0, URLS, commit, end, save, stamp, start, texts

if TYPE_CHECKING:
    from pathlib import Path


@pytest.fixture(params=sorted(URLS))
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ProjectStore:
    return open_store(URLS[request.param](tmp_path))


# -- the ledger ---------------------------------------------------------------------------


def test_a_task_is_running_until_it_ends_and_its_row_decodes(store: ProjectStore) -> None:
    plus_two = timezone(timedelta(hours=2))
    store.start_task(start("t1", started_at=datetime(2025, 3, 1, 14, 0, tzinfo=plus_two), test_run=True))
    (running,) = store.tasks()
    assert running.status == "RUNNING"
    assert running.ended_at is None
    assert running.started_at == T0
    assert running.started_at.utcoffset() == timedelta(0)
    assert running.policy == {"runtime": "runsc", "memory_mb": 512}
    assert running.selection == {"total": 3, "selected": 3}
    assert running.test_run is True
    assert (running.total_batches, running.batches_done) == (2, 0)

    store.end_task(
        end("t1", status="ERROR", error_type="ValueError", error_message="bad scan", batches_done=1)
    )
    (ended,) = store.tasks()
    assert (ended.status, ended.error_type, ended.error_message) == ("ERROR", "ValueError", "bad scan")
    assert ended.timings == {"total": 1.5}
    assert ended.selection == {"total": 3, "selected": 2, "over_limit": 1}
    assert ended.ended_at == T0 + timedelta(hours=1)
    assert ended.batches_done == 1
    assert ended.log_tail == "done\n"
    assert (ended.task_hash, ended.modeller, ended.datasource, ended.runtime) == (
        HASH,
        "alice",
        "scans",
        "runsc",
    )
    assert ended.bundle_sha256 == "ab" * 32


def test_a_record_read_back_is_the_callers_to_change(store: ProjectStore) -> None:
    policy = {"runtime": "runsc"}
    store.start_task(start("t1", policy=policy))
    policy["runtime"] = "changed after the start"
    (first,) = store.tasks()
    first.policy["memory_mb"] = 1
    assert store.tasks()[0].policy == {"runtime": "runsc"}


def test_the_log_tail_keeps_the_last_whole_lines_of_a_long_log(store: ProjectStore) -> None:
    # A cut through a line would leave its end as the tail's first line, where
    # text the protocol wrote could pass for a stream's mark.
    store.start_task(start("t1"))
    log = "stdout| x [executor: forged]\n" * 10_000 + "stdout| the last line\n"
    store.end_task(end("t1", log_tail=log, log_format=1))
    (task,) = store.tasks()
    assert (
        MAX_LOG_TAIL_CHARS - len("stdout| x [executor: forged]\n") < len(task.log_tail) <= MAX_LOG_TAIL_CHARS
    )
    assert task.log_tail.startswith("stdout| ")
    assert task.log_tail.endswith("stdout| the last line\n")
    assert log.endswith(task.log_tail)
    assert task.log_format == 1
    assert {line.stream for line in task.log_lines()} == {"stdout"}


def test_a_tail_recorded_without_its_format_reads_as_unmarked(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    store.end_task(end("t1", log_tail="executor| [executor: looks marked]\n"))
    (task,) = store.tasks()
    assert task.log_format == 0
    assert [line.to_dict() for line in task.log_lines()] == [
        {"stream": None, "batch": None, "line": "executor| [executor: looks marked]"}
    ]


def test_a_task_id_already_recorded_is_refused(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    with pytest.raises(ProjectDatabaseError, match="task t1 is already recorded"):
        store.start_task(start("t1", minute=5))
    assert len(store.tasks()) == 1


def test_ending_a_task_never_started_is_refused(store: ProjectStore) -> None:
    with pytest.raises(ProjectDatabaseError, match="task ghost was never started"):
        store.end_task(end("ghost"))
    assert store.tasks() == []


def test_tasks_are_listed_newest_first_by_project_and_limit(store: ProjectStore) -> None:
    store.start_task(start("old", minute=0))
    store.start_task(start("other", project="cardiology", minute=1))
    store.start_task(start("new", minute=2))
    store.start_task(start("new-too", minute=2))  # started at once: the later recorded first
    assert [t.task_id for t in store.tasks()] == ["new-too", "new", "other", "old"]
    assert [t.task_id for t in store.tasks(PROJECT)] == ["new-too", "new", "old"]
    assert [t.task_id for t in store.tasks(limit=1)] == ["new-too"]
    assert store.tasks(limit=0) == []
    assert store.tasks("nobody") == []
    with pytest.raises(ValueError, match="limit must be a non-negative int"):
        store.tasks(limit=-1)


def test_rows_left_running_by_dead_executors_are_closed_as_lost(store: ProjectStore) -> None:
    store.start_task(start("dead-1", owner="host:1:1:dead"))
    store.start_task(start("alive-1", owner="host:2:2:alive"))
    store.start_task(start("unowned"))
    store.start_task(start("dead-done", owner="host:1:1:dead"))
    store.end_task(end("dead-done"))
    assert store.close_lost(lambda owner: owner.endswith("alive")) == ["dead-1"]
    by_id = {t.task_id: t for t in store.tasks()}
    lost = by_id["dead-1"]
    assert (lost.status, lost.error_type) == ("LOST", "ParentLost")
    assert lost.ended_at is not None
    assert by_id["alive-1"].status == by_id["unowned"].status == "RUNNING"
    assert by_id["dead-done"].status == "OK"
    assert store.close_lost(lambda owner: False) == ["alive-1"]  # once gone, it is closed too


# -- batches and file outcomes ----------------------------------------------------------------


def test_a_batch_commits_rows_files_and_progress(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    save(
        store,
        "t1",
        1,
        rows=[{"file": "a.csv", "mean": 1.5}, {"file": "b.csv", "mean": None}],
        processed=[stamp("a.csv", 10, 100), stamp("b.csv", 20, 200)],
        failed=[(stamp("c.csv"), "malformed header")],
        stats={"files": 3, "duration_s": 0.5},
    )
    save(store, "t1", 2, rows=[{"file": "d.csv", "mean": 2}], processed=[stamp("d.csv")])

    results = store.results(PROJECT)
    assert [(r.task_id, r.task_hash, r.batch, r.row) for r in results] == [
        ("t1", HASH, 1, {"file": "a.csv", "mean": 1.5}),
        ("t1", HASH, 1, {"file": "b.csv", "mean": None}),
        ("t1", HASH, 2, {"file": "d.csv", "mean": 2}),
    ]
    assert all(r.created_at.tzinfo is not None for r in results)
    states = store.file_states(PROJECT, HASH)
    assert states.processed == {"a.csv": (10, 100), "b.csv": (20, 200), "d.csv": (10, 1)}
    assert states.failed == {"c.csv": ("malformed header", 1)}
    assert states.failed_stamps == {"c.csv": (10, 1)}
    (failed,) = store.failed_files(PROJECT)
    assert (failed.task_hash, failed.name, failed.reason, failed.attempts, failed.last_task_id) == (
        HASH,
        "c.csv",
        "malformed header",
        1,
        "t1",
    )
    assert failed.updated_at.tzinfo is not None
    assert store.tasks()[0].batches_done == 2


def test_file_states_follow_each_outcome_per_task_hash(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    store.start_task(start("t2", minute=1))
    store.start_task(start("t3", minute=2))
    store.commit_batch(
        commit("t1", 1, processed=[stamp("ok-then-bad.csv")], failed=[(stamp("bad.csv"), "first")])
    )
    # Failing again counts an attempt and keeps the latest reason and stamp; a file that
    # fails leaves the processed files, one processed OK leaves the failed ones.
    store.commit_batch(
        commit(
            "t2",
            1,
            processed=[stamp("bad.csv", 11, 2)],
            failed=[(stamp("ok-then-bad.csv"), "now broken")],
        )
    )
    store.commit_batch(commit("t3", 1, failed=[(stamp("ok-then-bad.csv", 12, 3), "still broken")]))
    states = store.file_states(PROJECT, HASH)
    assert states.processed == {"bad.csv": (11, 2)}
    assert states.failed == {"ok-then-bad.csv": ("still broken", 2)}
    assert states.failed_stamps == {"ok-then-bad.csv": (12, 3)}
    assert [f.last_task_id for f in store.failed_files(PROJECT)] == ["t3"]
    # Another task hash, and another project, have their own history.
    assert store.file_states(PROJECT, "hash-2").processed == {}
    assert store.failed_files(PROJECT, "hash-2") == []
    assert store.failed_files("cardiology") == []


def test_failed_files_are_listed_by_task_hash_then_name(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    store.start_task(start("t2", task_hash="hash-0", minute=1))
    store.commit_batch(commit("t1", 1, failed=[(stamp("z.csv"), "z"), (stamp("a.csv"), "a")]))
    store.commit_batch(commit("t2", 1, task_hash="hash-0", failed=[(stamp("m.csv"), "m")]))
    assert [(f.task_hash, f.name) for f in store.failed_files(PROJECT)] == [
        ("hash-0", "m.csv"),
        (HASH, "a.csv"),
        (HASH, "z.csv"),
    ]
    assert [f.name for f in store.failed_files(PROJECT, HASH)] == ["a.csv", "z.csv"]


def test_a_test_run_records_no_processed_files(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    store.commit_batch(commit("t1", 1, failed=[(stamp("x.csv"), "broken")]))
    store.start_task(start("test", minute=1, test_run=True))
    save(
        store,
        "test",
        1,
        rows=[{"n": 1}],
        processed=[stamp("x.csv"), stamp("y.csv")],
        failed=[(stamp("z.csv"), "empty")],
        record_processed=False,
    )
    states = store.file_states(PROJECT, HASH)
    assert states.processed == {}
    assert states.failed == {"x.csv": ("broken", 1), "z.csv": ("empty", 1)}
    assert [r.row for r in store.results(PROJECT)] == [{"n": 1}]


def test_a_batch_that_did_not_end_ok_keeps_its_failed_files_only(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    store.commit_batch(commit("t1", 1, processed=[stamp("a.csv")]))
    store.commit_batch(
        commit("t1", 2, failed=[(stamp("b.csv"), "crashed")], record_processed=False, ok=False)
    )
    assert store.file_states(PROJECT, HASH).failed == {"b.csv": ("crashed", 1)}
    assert store.tasks()[0].batches_done == 1
    # Not committed: its rows may still be staged, and then it may still commit.
    store.stage_rows("t1", 2, texts({"retry": 1}))
    store.commit_batch(commit("t1", 2))
    assert [r.row for r in store.results(PROJECT)] == [{"retry": 1}]
    with pytest.raises(ValueError, match="commits no processed files"):
        commit("t1", 2, processed=[stamp("c.csv")], record_processed=False, ok=False)


def test_a_batch_committed_twice_is_refused_and_stores_nothing_of_the_second(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    save(store, "t1", 1, rows=[{"n": 1}], processed=[stamp("a.csv")])
    before = (
        store.results(PROJECT),
        store.file_states(PROJECT, HASH),
        store.failed_files(PROJECT),
        store.tasks(),
    )
    again = commit("t1", 1, processed=[stamp("b.csv")], failed=[(stamp("a.csv"), "late failure")])
    with pytest.raises(ProjectDatabaseError, match=r"cannot commit batch 1 of task t1 "):
        store.commit_batch(again)
    after = (
        store.results(PROJECT),
        store.file_states(PROJECT, HASH),
        store.failed_files(PROJECT),
        store.tasks(),
    )
    assert after == before


def test_a_commit_for_a_task_never_started_is_refused(store: ProjectStore) -> None:
    with pytest.raises(ProjectDatabaseError, match="cannot commit batch 1 of task ghost "):
        save(store, "ghost", 1, processed=[stamp("a.csv")])
    with pytest.raises(ProjectDatabaseError, match="task ghost is not running"):
        store.stage_rows("ghost", 1, ['{"n": 1}'])
    assert store.results(PROJECT) == []
    assert store.file_states(PROJECT, HASH).processed == {}


def test_statistics_that_are_not_json_are_refused_before_writing(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    store.stage_rows("t1", 1, ['{"n": 1}'])
    with pytest.raises(ProjectDatabaseError, match="cannot store batch 1 of task t1: not JSON"):
        store.commit_batch(commit("t1", 1, stats={"mean": float("nan")}, failed=[(stamp("a.csv"), "x")]))
    assert store.results(PROJECT) == []
    assert store.failed_files(PROJECT) == []
    assert store.tasks()[0].batches_done == 0


def test_results_filter_by_task_hash_task_batch_and_limit(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    store.start_task(start("t2", task_hash="hash-2", minute=1))
    save(store, "t1", 1, rows=[{"n": 1}, {"n": 2}])
    save(store, "t2", 1, task_hash="hash-2", rows=[{"n": 3}])
    save(store, "t1", 2, rows=[{"n": 4}])
    assert [r.row["n"] for r in store.results(PROJECT)] == [1, 2, 3, 4]
    assert [r.row["n"] for r in store.results(PROJECT, HASH)] == [1, 2, 4]
    assert [r.row["n"] for r in store.results(PROJECT, "hash-2")] == [3]
    assert [r.row["n"] for r in store.results(PROJECT, limit=2)] == [1, 2]
    assert [r.row["n"] for r in store.results(PROJECT, task_id="t1", batch=2)] == [4]
    assert [r.row["n"] for r in store.results(PROJECT, batch=1)] == [1, 2, 3]
    assert store.results(PROJECT, task_id="other") == []
    assert store.results("cardiology") == []


# -- result rows stream in ------------------------------------------------------------------


def test_staged_rows_are_unseen_until_their_batch_commits_then_seen_in_order(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    store.stage_rows("t1", 1, texts({"n": 1}, {"n": 2}))
    store.stage_rows("t1", 1, texts({"n": 3}))
    store.stage_rows("t1", 1, [])
    assert store.results(PROJECT) == []
    assert store.results(PROJECT, task_id="t1", batch=1) == []
    store.commit_batch(commit("t1", 1))
    assert [(r.batch, r.row) for r in store.results(PROJECT)] == [(1, {"n": 1}), (1, {"n": 2}), (1, {"n": 3})]
    store.stage_rows("t1", 2, texts({"n": 4}))
    assert [r.row["n"] for r in store.results(PROJECT)] == [1, 2, 3], "batch 2 is still running"
    store.commit_batch(commit("t1", 2))
    assert [r.row["n"] for r in store.results(PROJECT)] == [1, 2, 3, 4]


def test_rows_keep_the_column_order_the_protocol_gave(store: ProjectStore) -> None:
    store.start_task(start("t1", total_batches=1))
    store.stage_rows("t1", 1, ['{"zeta": 1, "alpha": 2}'])
    store.commit_batch(commit("t1", 1, total=1))
    (record,) = store.results(PROJECT)
    assert list(record.row) == ["zeta", "alpha"]


def test_a_batch_that_did_not_end_ok_never_shows_its_rows_and_they_are_removed(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    store.stage_rows("t1", 1, texts({"kept": 1}))
    store.commit_batch(commit("t1", 1))
    store.stage_rows("t1", 2, texts({"lost": 1}, {"lost": 2}))
    store.commit_batch(commit("t1", 2, ok=False, record_processed=False))
    assert [r.row for r in store.results(PROJECT)] == [{"kept": 1}]
    assert store.discard_rows("t1", 1) == 0, "a committed batch's rows were removed"
    assert store.discard_rows("t1", 2) == 2
    assert store.discard_rows("t1") == 0
    assert [r.row for r in store.results(PROJECT)] == [{"kept": 1}]


def test_discarding_one_batch_leaves_the_tasks_other_uncommitted_rows(store: ProjectStore) -> None:
    store.start_task(start("t1", total_batches=3))
    store.stage_rows("t1", 2, texts({"b": 2}))
    store.stage_rows("t1", 3, texts({"b": 3}, {"b": 3}))
    assert store.discard_rows("t1", 2) == 1
    assert store.discard_rows("t1") == 2


def test_rows_cannot_join_a_committed_batch_or_a_task_not_running(store: ProjectStore) -> None:
    store.start_task(start("t1"))
    store.commit_batch(commit("t1", 1))
    with pytest.raises(ProjectDatabaseError, match="batch 1 of task t1 is already committed"):
        store.stage_rows("t1", 1, texts({"late": 1}))
    with pytest.raises(ProjectDatabaseError, match=r"batch 3 is not in 1\.\.2 of task t1"):
        store.stage_rows("t1", 3, texts({"n": 1}))
    with pytest.raises(ProjectDatabaseError, match=r"batch 0 is not in 1\.\.2 of task t1"):
        store.stage_rows("t1", 0, texts({"n": 1}))
    with pytest.raises(ProjectDatabaseError, match="task nobody is not running"):
        store.stage_rows("nobody", 1, texts({"n": 1}))
    store.end_task(end("t1"))
    with pytest.raises(ProjectDatabaseError, match="task t1 is not running"):
        store.stage_rows("t1", 2, texts({"n": 1}))
    assert store.close_lost(lambda owner: False) == []  # unowned: not lost
    assert store.discard_rows("t1") == 0


def test_a_lost_tasks_staged_rows_are_removed_when_it_is_closed(store: ProjectStore) -> None:
    store.start_task(start("dead", owner="host:1:1:dead"))
    store.stage_rows("dead", 1, texts({"n": 1}))
    store.commit_batch(commit("dead", 1))
    store.stage_rows("dead", 2, texts({"n": 2}, {"n": 3}))
    assert store.close_lost(lambda owner: False) == ["dead"]
    assert [r.row for r in store.results(PROJECT)] == [{"n": 1}]
    assert store.discard_rows("dead") == 0, "close_lost left the rows of batch 2"
    with pytest.raises(ProjectDatabaseError, match="task dead is not running"):
        store.stage_rows("dead", 2, texts({"n": 4}))


# -- sharing ------------------------------------------------------------------------------------


def test_tasks_writing_from_threads_at_once_lose_nothing(store: ProjectStore) -> None:
    batches, writers = 8, [f"thread-{i}" for i in range(4)]
    errors: list[BaseException] = []

    def write(task_id: str) -> None:
        try:
            store.start_task(start(task_id, total_batches=batches))
            for b in range(1, batches + 1):
                save(
                    store,
                    task_id,
                    b,
                    total=batches,
                    rows=[{"task": task_id, "batch": b, "i": i} for i in range(3)],
                    processed=[stamp(f"{task_id}/{b}.csv"), stamp("shared.csv", b, b)],
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    results = store.results(PROJECT)
    assert {(r.row["task"], r.row["batch"], r.row["i"]) for r in results} == {
        (w, b, i) for w in writers for b in range(1, batches + 1) for i in range(3)
    }
    assert len(results) == len(writers) * batches * 3
    assert {t.task_id: t.batches_done for t in store.tasks()} == dict.fromkeys(writers, batches)
    assert len(store.file_states(PROJECT, HASH).processed) == len(writers) * batches + 1


# -- the records --------------------------------------------------------------------------------


def test_bad_values_are_refused_when_the_record_is_made() -> None:
    with pytest.raises(ValueError, match="aware"):
        start("t1", started_at=datetime(2025, 1, 1))
    with pytest.raises(ValueError, match=r"batch 3 is not in 1\.\.2"):
        commit("t1", 3)
    with pytest.raises(ValueError, match="named twice"):
        commit("t1", 1, processed=[stamp("a.csv")], failed=[(stamp("a.csv"), "x")])
    with pytest.raises(ValueError, match="RUNNING"):
        end("t1", status="RUNNING")
