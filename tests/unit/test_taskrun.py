"""The parent's data lifecycle (executor/task/: run, batch, ledger) on a scripted engine and a real SQLite db.

Containers are :class:`~executor.testing.FakeBackend` programs; where a
protocol must really run, :func:`~executor.testing.host_runtime` runs our init
and child runtime as host processes against the real server and session. The
project database is a real file in ``tmp_path``. Every test's executor has
private run, spool and uid directories, and afterwards none may hold anything.

Each test names the bug it catches and how it was shown to fail (a temporary
edit of the code, since reverted).
"""

from __future__ import annotations

import itertools
import json
import shutil
import sqlite3
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from executor.data.sqlite import ProjectDatabase
from executor.data.viewpaths import PATH_MAX
from executor.errors import ConfigurationError, ContainerError, ProjectDatabaseError
from executor.hooks import AlgorithmProgress, BatchRun, Event, ResultsSaved, TaskEnded, TaskStarted
from executor.mailbox.crypto import TaskKeys
from executor.outcome import Status
from executor.policy import IsolationPolicy
from executor.runner import Executor
from executor.spec import TaskFlags, TaskSpec
from executor.task import run as taskrun
from executor.task.launch import SANDBOX_DATA
from executor.task.plan import default_task_hash
from executor.testing import (
    FakeBackend,
    FakeContainer,
    InMemoryTransport,
    LocalModeller,
    Program,
    exits,
    host_runtime,
    then,
)
from tests.deeptree import deep_file

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from executor.backends import ExitInfo
    from executor.data.store import BatchCommit
    from executor.mailbox.transport import Transport

pytestmark = pytest.mark.timeout(120)

# One uid only: a lease that is not given back makes the next lease fail.
POLICY = IsolationPolicy.hardened().replace(
    heartbeat_interval_s=0.05, heartbeat_timeout_s=10, timeout_s=60, uid_start=30001, uid_count=1
)
PROJECT = "oncology"

# Per file of its view, in name order: "bad..." is reported failed; any other
# file gets a result row and, unless it says "die...", is reported processed;
# "die..." ends the sandbox with exit code 3 right after its row is saved.
PER_FILE = """
import os


def run(ctx):
    names = sorted(p.relative_to(ctx.data_dir).as_posix() for p in ctx.data_dir.rglob("*") if p.is_file())
    for name in names:
        text = (ctx.data_dir / name).read_text()
        if text.startswith("bad"):
            ctx.file_failed(name, "malformed")
            continue
        ctx.save_results([{"file": name}])
        if text.startswith("die"):
            os._exit(3)
        ctx.file_processed(name)
    return {"files": names}
"""


@dataclass
class Rig:
    """Private directories, a project database, and the executors a test made."""

    run_dir: Path
    spool_dir: Path
    uid_dir: Path
    scratch: Path
    db_path: Path
    executors: list[Executor] = field(default_factory=list)

    def db(self) -> ProjectDatabase:
        """The test's project database (one file; each call opens it again)."""
        return ProjectDatabase(self.db_path)

    def executor(
        self,
        backend: FakeBackend,
        *,
        db: ProjectDatabase | None = None,
        transport: Transport | None = None,
        hooks: tuple[Callable[[Event], object], ...] = (),
    ) -> Executor:
        ex = Executor(
            backend,
            policy=POLICY,
            transport=transport,
            run_dir=self.run_dir,
            spool_dir=self.spool_dir,
            uid_dir=self.uid_dir,
            db=db,
            hooks=hooks,
        )
        self.executors.append(ex)
        return ex

    def runtime(self) -> Program:
        return host_runtime(self.scratch)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    # Short: the task's socket path must fit a sockaddr_un.
    run_dir = Path(tempfile.mkdtemp(prefix="se-", dir="/tmp"))
    rig = Rig(run_dir, tmp_path / "spool", tmp_path / "uids", tmp_path / "scratch", tmp_path / "pod.db")
    try:
        yield rig
        for ex in rig.executors:
            ex.close()
        leftovers = sorted(str(p) for p in run_dir.iterdir())
        spools = sorted(str(p) for p in rig.spool_dir.iterdir()) if rig.spool_dir.exists() else []
        assert not leftovers, f"task directories left behind: {leftovers}"
        assert not spools, f"spools left behind: {spools}"
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def make_data(tmp_path: Path) -> Callable[[dict[str, str]], Path]:
    """A datasource the sandbox user can read, holding ``files`` (name -> text)."""
    counter = itertools.count()

    def make(files: dict[str, str]) -> Path:
        root = tmp_path / f"data-{next(counter)}"
        root.mkdir()
        for name, text in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            path.chmod(0o644)
        for d in (root, *(p for p in root.rglob("*") if p.is_dir())):
            d.chmod(0o755)
        return root

    return make


@pytest.fixture
def modeller(tmp_path: Path) -> Iterator[LocalModeller]:
    transport = InMemoryTransport(spool_dir=tmp_path / "transport")
    m = LocalModeller(transport, spool_dir=tmp_path / "modeller")
    try:
        yield m
    finally:
        m.close()
        transport.close()


def in_turn(*programs: Program) -> Program:
    """The n-th container runs the n-th program (batches run one after the other)."""
    made = itertools.count()

    def program(container: FakeContainer) -> ExitInfo | None:
        return programs[next(made)](container)

    return program


def creates(backend: FakeBackend) -> int:
    return sum(op == "create" for op, _ in backend.calls)


def modeller_heard(modeller: LocalModeller, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message the task sent its modeller, in order, bodies decoded."""
    heard = []
    while (message := modeller.receive(task_id, 0.2)) is not None:
        heard.append((message.type, json.loads(message.read())))
    return heard


def files_in(view: Path) -> list[str]:
    return sorted(p.relative_to(view).as_posix() for p in view.rglob("*") if p.is_file())


# -- the modeller hears of batches -------------------------------------------------------


def test_the_modeller_of_a_batched_task_hears_the_count_each_batch_and_success(
    rig, make_protocol, make_data, modeller
):
    # Fails if the batch messages go: made to fail by numbering batches from 0
    # (enumerate(..., start=0) in _each_batch) and by sending BATCHES_COMPLETE
    # only when a batch failed.
    keys = TaskKeys.generate()
    modeller.add_task("t-batched", keys)
    data = make_data({"a.csv": "1", "b.csv": "2", "c.csv": "3"})
    ex = rig.executor(FakeBackend(rig.runtime()), transport=modeller.transport)
    spec = TaskSpec(
        protocol_dir=make_protocol(PER_FILE), data_dir=data, task_id="t-batched", keys=keys, batch_size=2
    )
    outcome = ex.run(spec)
    assert outcome.status is Status.OK, outcome.error
    assert modeller_heard(modeller, "t-batched") == [
        ("NUMBER_OF_BATCHES", {"number_of_batches": 2}),
        ("CURRENT_BATCH_ID", {"batch_id": 1}),
        ("CURRENT_BATCH_ID", {"batch_id": 2}),
        ("BATCHES_COMPLETE", {"state": "SUCCESS"}),
    ]
    assert outcome.result == [{"files": ["a.csv", "b.csv"]}, {"files": ["c.csv"]}]


@pytest.mark.parametrize(
    ("batch_size", "flag", "batched"), [(2, False, True), (0, True, True), (0, False, False)]
)
def test_the_sandbox_is_told_the_task_is_batched_exactly_when_it_runs_in_batches(
    rig, make_protocol, make_data, batch_size, flag, batched
):
    # "Batched" is derived once (TaskSpec.batched): a batch size without the
    # seed's flag still runs in batches, and the sandbox's ctx.flags says so.
    # Made to fail by sending spec.flags.batched_execution as before.
    data = make_data({"a.csv": "1"})
    spec = TaskSpec(
        protocol_dir=make_protocol("def run(ctx):\n    return ctx.flags.batched_execution\n"),
        data_dir=data,
        batch_size=batch_size,
        flags=TaskFlags(batched_execution=flag),
    )
    outcome = rig.executor(FakeBackend(rig.runtime())).run(spec)
    assert outcome.status is Status.OK, outcome.error
    assert outcome.result == ([batched] if batched else batched)
    assert (outcome.batches is not None) == batched


def test_the_task_config_is_built_once_for_all_its_batches(rig, make_protocol, make_data, monkeypatch):
    # Every batch's sandbox fetches the same configuration; it was rebuilt per
    # batch. Made to fail by building it in BatchRunner._serve again.
    from executor.rpc import serde

    built: list[str] = []
    real = serde.task_config

    def counted(*args: Any, **kwargs: Any) -> Any:
        built.append(args[1])
        return real(*args, **kwargs)

    monkeypatch.setattr(serde, "task_config", counted)
    data = make_data({"a.csv": "1", "b.csv": "2", "c.csv": "3"})
    spec = TaskSpec(protocol_dir=make_protocol(PER_FILE), data_dir=data, task_id="t-once", batch_size=1)
    outcome = rig.executor(FakeBackend(rig.runtime())).run(spec)
    assert outcome.status is Status.OK, outcome.error
    assert outcome.batches == {"total": 3, "completed": 3, "size": 1}
    assert built == ["t-once"]


def test_the_modeller_of_a_batched_task_whose_second_batch_fails_hears_failed_and_one_abort(
    rig, make_protocol, make_data, modeller
):
    # Fails if a failed batch is reported as SUCCESS or the task goes on:
    # made to fail by computing the state as "SUCCESS" whatever completed was,
    # and by removing the `if not done.outcome.ok: break`.
    keys = TaskKeys.generate()
    modeller.add_task("t-fails", keys)
    data = make_data({"a.csv": "1", "b.csv": "2", "c.csv": "3"})
    backend = FakeBackend(in_turn(rig.runtime(), exits(3, stderr="batch two died\n"), rig.runtime()))
    ex = rig.executor(backend, transport=modeller.transport)
    spec = TaskSpec(
        protocol_dir=make_protocol(PER_FILE), data_dir=data, task_id="t-fails", keys=keys, batch_size=1
    )
    outcome = ex.run(spec)
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert outcome.error.exit_code == 3
    heard = modeller_heard(modeller, "t-fails")
    assert [kind for kind, _ in heard] == [
        "NUMBER_OF_BATCHES",
        "CURRENT_BATCH_ID",
        "CURRENT_BATCH_ID",
        "TASK_ABORT",
        "BATCHES_COMPLETE",
    ]
    assert heard[0][1] == {"number_of_batches": 3}
    assert [body["batch_id"] for kind, body in heard if kind == "CURRENT_BATCH_ID"] == [1, 2]
    assert heard[3][1]["exception_type"] == "ContainerExited"
    assert heard[-1] == ("BATCHES_COMPLETE", {"state": "FAILED"})
    assert creates(backend) == 2


def test_the_modeller_of_an_unbatched_task_hears_no_batch_messages(rig, make_protocol, make_data, modeller):
    # Fails if an unbatched task is told of batches: made to fail by dropping
    # the `if plan.batched` before NUMBER_OF_BATCHES and CURRENT_BATCH_ID.
    keys = TaskKeys.generate()
    modeller.add_task("t-whole", keys)
    data = make_data({"a.csv": "1", "b.csv": "2"})
    ex = rig.executor(FakeBackend(rig.runtime()), transport=modeller.transport)
    outcome = ex.run(
        TaskSpec(protocol_dir=make_protocol(PER_FILE), data_dir=data, task_id="t-whole", keys=keys)
    )
    assert outcome.status is Status.OK, outcome.error
    assert outcome.result == {"files": ["a.csv", "b.csv"]}
    assert outcome.batches is None
    assert modeller_heard(modeller, "t-whole") == []


# -- what a batch commits ------------------------------------------------------------------


def test_a_batch_that_does_not_end_ok_commits_only_its_failures_and_no_later_batch_runs(
    rig, make_protocol, make_data
):
    # Fails if a failed batch commits rows or processed files, drops the
    # failures it reported, or is followed by another batch: made to fail by
    # committing `done.rows` whatever the status (commit_batch then refuses
    # the batch), by committing `failed=[]` when not ok, and by removing the
    # break after a batch that did not end OK.
    data = make_data({"a.csv": "1", "b.csv": "2", "c.csv": "bad", "d.csv": "die", "e.csv": "5"})
    db = rig.db()
    backend = FakeBackend(rig.runtime())
    ex = rig.executor(backend, db=db)
    spec = TaskSpec(
        protocol_dir=make_protocol(PER_FILE),
        data_dir=data,
        project_id=PROJECT,
        task_id="t-partial",
        task_hash="h-partial",
        batch_size=2,
    )
    outcome = ex.run(spec)
    # Batch 2 ([c.csv, d.csv]) reported c failed, saved a row for d, then exited 3.
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.exit_code) == ("ContainerExited", 3)
    assert outcome.batches == {"total": 3, "completed": 1, "size": 2}
    assert outcome.saved_rows == 2
    assert creates(backend) == 2, "a batch ran after one that did not end OK"

    assert [(r.batch, r.row) for r in db.results(PROJECT, "h-partial")] == [
        (1, {"file": "a.csv"}),
        (1, {"file": "b.csv"}),
    ]
    states = db.file_states(PROJECT, "h-partial")
    assert sorted(states.processed) == ["a.csv", "b.csv"]
    assert states.failed == {"c.csv": ("malformed", 1)}
    (task,) = db.tasks(PROJECT)
    assert (task.status, task.error_type, task.batches_done, task.total_batches) == (
        "ERROR",
        "ContainerExited",
        1,
        3,
    )

    # The next new-data-only run resumes at the first uncommitted files: d and e.
    (data / "d.csv").write_text("4")
    again = ex.run(
        TaskSpec(
            protocol_dir=spec.protocol_dir,
            data_dir=data,
            project_id=PROJECT,
            task_hash="h-partial",
            batch_size=2,
            flags=TaskFlags(run_on_new_data_only=True),
        )
    )
    assert again.status is Status.OK, again.error
    assert again.selection == {
        "total": 5,
        "selected": 2,
        "skipped_processed": 2,
        "skipped_failed": 1,
        "over_limit": 0,
        "skipped_unusable": 0,
    }
    assert again.result == [{"files": ["d.csv", "e.csv"]}]


# -- cancel ------------------------------------------------------------------------------


def test_a_task_cancelled_before_it_runs_starts_no_container(rig, make_protocol, make_data):
    # Fails if the cancel is only noticed by the supervisor: made to fail by
    # removing the cancel check at the top of the batch loop (a container is
    # then created, and cancelled while it runs).
    data = make_data({"a.csv": "1"})
    db = rig.db()
    backend = FakeBackend(rig.runtime())
    cancel = threading.Event()
    cancel.set()
    outcome = rig.executor(backend, db=db).run(
        TaskSpec(protocol_dir=make_protocol(PER_FILE), data_dir=data, project_id=PROJECT, task_id="t-cancel"),
        cancel=cancel,
    )
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert outcome.error.type == "Cancelled"
    assert creates(backend) == 0
    (task,) = db.tasks(PROJECT)
    assert (task.status, task.batches_done) == ("CANCELLED", 0)
    assert db.results(PROJECT) == []


class _CancelAfterFirstBatch(ProjectDatabase):
    """Sets ``cancel`` as batch 1 commits: exactly between batch 1 and batch 2, no race."""

    def __init__(self, path: Path, cancel: threading.Event) -> None:
        super().__init__(path)
        self.cancel = cancel

    def commit_batch(self, commit: BatchCommit) -> None:
        super().commit_batch(commit)
        if commit.batch == 1:
            self.cancel.set()


def test_a_task_cancelled_between_batches_keeps_the_first_and_starts_no_second(rig, make_protocol, make_data):
    # Fails if a cancel between batches still starts the next container:
    # made to fail by removing the cancel check at the top of the batch loop
    # (batch 2's container is then created and cancelled while it runs).
    data = make_data({"a.csv": "1", "b.csv": "2"})
    cancel = threading.Event()
    db = _CancelAfterFirstBatch(rig.db_path, cancel)
    backend = FakeBackend(rig.runtime())
    outcome = rig.executor(backend, db=db).run(
        TaskSpec(
            protocol_dir=make_protocol(PER_FILE),
            data_dir=data,
            project_id=PROJECT,
            task_id="t-between",
            task_hash="h-between",
            batch_size=1,
        ),
        cancel=cancel,
    )
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert outcome.error.type == "Cancelled"
    assert "before batch 2 of 2" in outcome.error.message
    assert outcome.batches == {"total": 2, "completed": 1, "size": 1}
    assert creates(backend) == 1
    assert [r.row for r in db.results(PROJECT, "h-between")] == [{"file": "a.csv"}]
    assert sorted(db.file_states(PROJECT, "h-between").processed) == ["a.csv"]
    (task,) = db.tasks(PROJECT)
    assert (task.status, task.batches_done) == ("CANCELLED", 1)


# -- the ledger ----------------------------------------------------------------------------


def test_an_engine_refusing_the_create_closes_the_ledger_row_and_still_raises(rig, make_protocol, make_data):
    # Fails if the ledger row stays RUNNING: made to fail by removing the
    # _end_ledger call in TaskRun.run's `except BaseException` (the row then
    # keeps status RUNNING and no end time).
    data = make_data({"a.csv": "1"})
    db = rig.db()
    backend = FakeBackend(
        rig.runtime(), create_errors=[ContainerError("container create failed: 409 Conflict")]
    )
    with pytest.raises(ContainerError, match="409 Conflict"):
        rig.executor(backend, db=db).run(
            TaskSpec(
                protocol_dir=make_protocol(PER_FILE), data_dir=data, project_id=PROJECT, task_id="t-refused"
            )
        )
    (task,) = db.tasks(PROJECT)
    assert task.status == "ERROR"
    assert task.error_type == "ContainerError"
    assert task.error_message is not None
    assert "409 Conflict" in task.error_message
    assert task.ended_at is not None
    assert backend.containers == {}
    assert list(rig.run_dir.iterdir()) == []


def test_an_engine_failing_mid_task_keeps_the_count_tells_the_modeller_and_the_hooks(
    rig, make_protocol, make_data, modeller
):
    # Made to fail by passing 0 batches done to the ledger on that path (as it
    # did), by not telling the modeller (it then heard nothing after
    # CURRENT_BATCH_ID 2), and by emitting no TaskEnded there.
    keys = TaskKeys.generate()
    modeller.add_task("t-mid", keys)
    data = make_data({"a.csv": "1", "b.csv": "2"})
    db = rig.db()
    heard: list[Event] = []
    backend = FakeBackend(
        rig.runtime(), create_errors=[None, ContainerError("container create failed: 409 Conflict")]
    )
    with pytest.raises(ContainerError, match="409 Conflict"):
        rig.executor(backend, db=db, transport=modeller.transport, hooks=(heard.append,)).run(
            TaskSpec(
                protocol_dir=make_protocol(PER_FILE),
                data_dir=data,
                project_id=PROJECT,
                task_id="t-mid",
                keys=keys,
                batch_size=1,
            )
        )
    (task,) = db.tasks(PROJECT)
    assert (task.status, task.error_type, task.batches_done, task.total_batches) == (
        "ERROR",
        "ContainerError",
        1,
        2,
    )
    assert [r.row for r in db.results(PROJECT)] == [{"file": "a.csv"}]
    said = modeller_heard(modeller, "t-mid")
    assert [t for t, _ in said] == [
        "NUMBER_OF_BATCHES",
        "CURRENT_BATCH_ID",
        "CURRENT_BATCH_ID",
        "TASK_ABORT",
        "BATCHES_COMPLETE",
    ]
    assert said[3][1]["exception_type"] == "ContainerError"
    assert said[4][1] == {"state": "FAILED"}
    assert isinstance(heard[-1], TaskEnded)
    assert heard[-1].outcome.status is Status.ERROR
    assert heard[-1].outcome.error is not None
    assert heard[-1].outcome.error.type == "ContainerError"


class _RefusesCommits(ProjectDatabase):
    """A project database that starts and ends tasks but cannot commit a batch (locked, full)."""

    def commit_batch(self, commit: BatchCommit) -> None:
        raise ProjectDatabaseError(f"{self.path} is locked by another process (waited 10 s)")


def test_a_batch_that_cannot_be_recorded_ends_the_task_as_an_error_and_says_so(
    rig, make_protocol, make_data, modeller
):
    # Made to fail by letting the commit's error escape run() (the outcome is
    # then lost), and by keeping the batch's OK status and result.
    keys = TaskKeys.generate()
    modeller.add_task("t-unrecorded", keys)
    data = make_data({"a.csv": "1", "b.csv": "2"})
    db = _RefusesCommits(rig.db_path)
    backend = FakeBackend(rig.runtime())
    outcome = rig.executor(backend, db=db, transport=modeller.transport).run(
        TaskSpec(
            protocol_dir=make_protocol(PER_FILE),
            data_dir=data,
            project_id=PROJECT,
            task_id="t-unrecorded",
            keys=keys,
            batch_size=1,
        )
    )
    assert outcome.status is Status.ERROR
    assert outcome.result is None
    assert outcome.error is not None
    assert outcome.error.type == "ProjectDatabaseError"
    assert "batch 1 ran but could not be recorded" in outcome.error.message
    assert outcome.batches == {"total": 2, "completed": 0, "size": 1}
    assert creates(backend) == 1  # nothing more runs once what ran cannot be recorded
    said = modeller_heard(modeller, "t-unrecorded")
    aborts = [body for kind, body in said if kind == "TASK_ABORT"]
    assert [(a["reason"], a["exception_type"]) for a in aborts] == [("NotRecorded", "ProjectDatabaseError")]
    (task,) = db.tasks(PROJECT)
    assert (task.status, task.error_type) == ("ERROR", "ProjectDatabaseError")


def test_a_task_id_already_in_the_ledger_is_refused_and_the_earlier_row_is_left_alone(
    rig, make_protocol, make_data
):
    # Made to fail by closing the ledger row on that path whatever happened
    # (it then overwrote the earlier task's OK with this one's refusal).
    data = make_data({"a.csv": "1"})
    db = rig.db()
    heard: list[Event] = []
    backend = FakeBackend(rig.runtime())
    ex = rig.executor(backend, db=db, hooks=(heard.append,))
    spec = TaskSpec(protocol_dir=make_protocol(PER_FILE), data_dir=data, project_id=PROJECT, task_id="t-same")
    assert ex.run(spec).status is Status.OK
    heard.clear()
    with pytest.raises(ProjectDatabaseError, match="t-same is already recorded"):
        ex.run(spec)
    (task,) = db.tasks(PROJECT)
    assert (task.status, task.error_type, task.batches_done) == ("OK", None, 1)
    assert creates(backend) == 1
    assert heard == []  # a task that never started has no events


# -- hooks ---------------------------------------------------------------------------------


@pytest.mark.timeout(30)  # a stalled task fails here rather than hang; no time is asserted
def test_hooks_that_raise_or_block_neither_fail_nor_stall_the_task(
    rig, make_protocol, make_data, monkeypatch
):
    # Fails if a hook can fail or stall the task: made to fail by calling
    # hooks inline from TaskRun._emit and by joining hook threads without the
    # drain bound in HookDispatcher._close (the blocking hook then never lets
    # run() return: the timeout fails it), and by letting _Worker._run end on
    # a hook's exception (the raising hook then never sees TaskEnded).
    monkeypatch.setattr(taskrun, "HOOK_DRAIN_S", 1.0)
    release = threading.Event()
    good: list[Event] = []
    raised_on: list[Event] = []

    def records(event: Event) -> None:
        good.append(event)

    def raises(event: Event) -> None:
        raised_on.append(event)
        raise RuntimeError("an orchestrator's hook is broken")

    def blocks(event: Event) -> None:
        release.wait()  # never set while the task runs

    data = make_data({"a.csv": "1", "b.csv": "2"})
    ex = rig.executor(FakeBackend(rig.runtime()), db=rig.db(), hooks=(records, raises, blocks))
    try:
        outcome = ex.run(TaskSpec(protocol_dir=make_protocol(PER_FILE), data_dir=data, project_id=PROJECT))
    finally:
        release.set()
    assert outcome.status is Status.OK, outcome.error
    kinds = [type(e) for e in good]
    assert kinds[0] is TaskStarted
    assert kinds[-1] is TaskEnded
    assert kinds.count(TaskStarted) == kinds.count(TaskEnded) == 1
    ended = good[-1]
    assert isinstance(ended, TaskEnded)
    assert ended.outcome is outcome
    assert any(isinstance(e, ResultsSaved) and e.rows == 2 for e in good)
    assert isinstance(raised_on[-1], TaskEnded), "a hook that raised stopped receiving events"


# -- test runs and the flags -----------------------------------------------------------------


def test_a_test_run_records_rows_but_no_processed_files(rig, make_protocol, make_data):
    # Fails if a test run marks files processed: made to fail by committing
    # processed files and record_processed=ok regardless of flags.test_run
    # (the later new-data-only run then skips a.csv).
    data = make_data({"a.csv": "1", "b.csv": "2"})
    db = rig.db()
    ex = rig.executor(FakeBackend(rig.runtime()), db=db)
    protocol = make_protocol(PER_FILE)
    trial = ex.run(
        TaskSpec(
            protocol_dir=protocol,
            data_dir=data,
            project_id=PROJECT,
            task_hash="h-trial",
            flags=TaskFlags(test_run=True),
        )
    )
    assert trial.status is Status.OK, trial.error
    assert trial.result == {"files": ["a.csv"]}  # a test run sees one file
    assert [r.row for r in db.results(PROJECT, "h-trial")] == [{"file": "a.csv"}]
    assert db.file_states(PROJECT, "h-trial").processed == {}

    real = ex.run(
        TaskSpec(
            protocol_dir=protocol,
            data_dir=data,
            project_id=PROJECT,
            task_hash="h-trial",
            flags=TaskFlags(run_on_new_data_only=True),
        )
    )
    assert real.status is Status.OK, real.error
    assert real.selection is not None
    assert (real.selection["selected"], real.selection["skipped_processed"]) == (2, 0)
    assert real.result == {"files": ["a.csv", "b.csv"]}
    assert sorted(db.file_states(PROJECT, "h-trial").processed) == ["a.csv", "b.csv"]


def test_new_data_only_without_a_database_is_refused_before_anything_starts(rig, make_protocol, make_data):
    # Fails if the flag is accepted without a database (every file would be
    # "new" each run): made to fail by removing the check in Executor.run.
    backend = FakeBackend(rig.runtime())
    with pytest.raises(ConfigurationError, match="run_on_new_data_only needs a project database"):
        rig.executor(backend).run(
            TaskSpec(
                protocol_dir=make_protocol(PER_FILE),
                data_dir=make_data({"a.csv": "1"}),
                flags=TaskFlags(run_on_new_data_only=True),
            )
        )
    assert backend.calls == []
    assert list(rig.run_dir.iterdir()) == []


# -- the task hash -------------------------------------------------------------------------


def test_the_default_task_hash_follows_the_parameters_and_the_bundle_only():
    # Fails if either input is left out of the digest, or key order matters:
    # made to fail by dropping the parameters' update from default_task_hash,
    # and by removing sort_keys=True.
    bundle, other_bundle = "a" * 64, "b" * 64
    base = default_task_hash(bundle, {"epochs": 3, "lr": 0.1})
    assert base == default_task_hash(bundle, {"lr": 0.1, "epochs": 3})
    assert base != default_task_hash(bundle, {"epochs": 4, "lr": 0.1})
    assert base != default_task_hash(bundle, {"epochs": 3})
    assert base != default_task_hash(other_bundle, {"epochs": 3, "lr": 0.1})
    assert len(base) == 64
    assert int(base, 16) >= 0


def test_a_task_without_a_hash_gets_one_from_its_bundle_and_parameters(rig, make_protocol, make_data):
    # Fails if the executor hashes something else (e.g. the protocol's path or
    # the task id): made to fail by passing spec.protocol_dir's name instead
    # of bundle.sha256 to default_task_hash in Executor.run.
    data = make_data({"a.csv": "1"})
    ex = rig.executor(FakeBackend(exits(0)))
    source = "def run(ctx):\n    return 1\n"
    first, twin, changed = make_protocol(source), make_protocol(source), make_protocol(source + "# v2\n")

    def task_hash(protocol: Path, **kwargs: Any) -> str:
        outcome = ex.run(TaskSpec(protocol_dir=protocol, data_dir=data, **kwargs))
        assert outcome.task_hash
        return outcome.task_hash

    base = task_hash(first, parameters={"epochs": 3})
    assert task_hash(first, parameters={"epochs": 3}) == base
    assert task_hash(twin, parameters={"epochs": 3}) == base  # the same bundle elsewhere
    assert task_hash(first, parameters={"epochs": 4}) != base
    assert task_hash(changed, parameters={"epochs": 3}) != base
    assert task_hash(first, parameters={"epochs": 3}, task_hash="given") == "given"


# -- the data view -------------------------------------------------------------------------


def test_each_container_sees_exactly_its_batch_in_a_view_removed_afterwards(rig, make_protocol, make_data):
    # Fails if a container's /data shows more than its batch, or the view
    # outlives its batch: made to fail by building each batch's DataView from
    # plan.selection.files instead of the batch, and by dropping view.remove()
    # in BatchRunner.run (the next batch's view then cannot be made).
    data = make_data({"a.csv": "1", "c.csv": "3", "scans/b.csv": "2"})
    views: list[tuple[Path, list[str]]] = []

    def look(container: FakeContainer) -> None:
        (mount,) = [m for m in container.spec.mounts if m.target == SANDBOX_DATA]
        assert mount.read_only
        views.append((Path(mount.source), files_in(Path(mount.source))))

    backend = FakeBackend(then(look, rig.runtime()))
    outcome = rig.executor(backend).run(
        TaskSpec(protocol_dir=make_protocol(PER_FILE), data_dir=data, batch_size=2)
    )
    assert outcome.status is Status.OK, outcome.error
    assert [names for _, names in views] == [["a.csv", "c.csv"], ["scans/b.csv"]]
    assert outcome.result == [{"files": ["a.csv", "c.csv"]}, {"files": ["scans/b.csv"]}]
    for container in backend.containers.values():
        assert data not in [Path(m.source) for m in container.spec.mounts], (
            "the datasource itself was mounted"
        )
    for view, _ in views:
        assert rig.run_dir in view.parents
        assert not view.exists()


def test_a_datasource_file_deeper_than_path_max_is_skipped_and_counted_and_the_task_runs(
    rig, make_protocol, make_data
):
    # Finding 7 of the third red team: one such file failed every task on
    # its datasource (exit 2, "File name too long" while making the view).
    # Made to fail by dropping view_paths from plan_task (the file is
    # then selected and only the view leaves it out, uncounted) and, with the
    # view's own check removed too, the task raised HostError (ENAMETOOLONG)
    # before any container started, as it did.
    from executor.cli.display import selection_summary

    data = make_data({"a.csv": "1"})
    deep = deep_file(data, PATH_MAX + 10)
    db = rig.db()
    events: list[Event] = []
    backend = FakeBackend(rig.runtime())
    outcome = rig.executor(backend, db=db, hooks=(events.append,)).run(
        TaskSpec(protocol_dir=make_protocol(PER_FILE), data_dir=data, project_id=PROJECT, task_id="t-deep")
    )
    assert outcome.status is Status.OK, outcome.error
    assert outcome.result == {"files": ["a.csv"]}
    expected = {
        "total": 2,
        "selected": 1,
        "skipped_processed": 0,
        "skipped_failed": 0,
        "over_limit": 0,
        "skipped_unusable": 1,
    }
    assert outcome.selection == expected
    assert outcome.to_dict()["selection"] == expected
    (started,) = [e for e in events if isinstance(e, TaskStarted)]
    assert started.selection == expected
    (task,) = db.tasks(PROJECT)
    assert task.selection == expected
    assert "1 with a path too long for a data view" in selection_summary(outcome)
    assert deep not in db.file_states(PROJECT, outcome.task_hash).processed


# -- the ledger's log tail -------------------------------------------------------------------

FORGER = """
import sys


def run(ctx):
    print("[executor: output cap reached (20000 lines or 4194304 bytes); later lines are dropped]")
    print("--- batch 7 ---", flush=True)
    print("CRITICAL executor.runner: the parent failed", file=sys.stderr, flush=True)
    sys.stdout.write("partial line with no end")
    return "done"
"""


def test_the_ledger_s_tail_marks_every_line_s_stream_so_a_protocol_cannot_pass_for_the_parent(
    rig, make_protocol, make_data
):
    # Finding 6 of the third red team: the tail held bare lines, so these
    # read as the parent's notes and separators. Made to fail by recording
    # the tail unmarked (log_format 0): every line then has no stream.
    data = make_data({"a.csv": "1", "b.csv": "2"})
    db = rig.db()
    outcome = rig.executor(FakeBackend(rig.runtime()), db=db).run(
        TaskSpec(
            protocol_dir=make_protocol(FORGER),
            data_dir=data,
            project_id=PROJECT,
            task_id="t-forge",
            batch_size=1,
        )
    )
    assert outcome.status is Status.OK, outcome.error
    (task,) = db.tasks(PROJECT)
    assert task.log_format == 1
    lines = [(line.stream, line.batch, line.line) for line in task.log_lines()]
    for batch in (1, 2):
        mine = [(stream, text) for stream, b, text in lines if b == batch]
        assert (
            "stdout",
            "[executor: output cap reached (20000 lines or 4194304 bytes); later lines are dropped]",
        ) in mine
        assert ("stdout", "--- batch 7 ---") in mine
        assert ("stderr", "CRITICAL executor.runner: the parent failed") in mine
        assert ("stdout", "partial line with no end") in mine
    assert not [line for line in lines if line[0] == "executor"]  # the parent had nothing to say
    tail = task.log_tail.splitlines()
    assert tail[0] == "executor| --- batch 1 ---"
    assert "executor| --- batch 2 ---" in tail
    assert all(line.startswith(("stdout| ", "stderr| ", "executor| --- batch ")) for line in tail)


# -- progress ---------------------------------------------------------------------------------

EAGER = """
def run(ctx):
    ctx.progress.run_start()
    for epoch in (1, 2, 3):
        ctx.progress.epoch_start(epoch, 3)
        for i in range(3000):
            ctx.progress.step(i, 3000, "loss", epoch=epoch, max_epochs=3)
        ctx.progress.epoch_end(epoch, 3)
    for i in range(500):
        ctx.progress.step(i, 500, "evaluating")
    return "done"  # no run_end: the last step still reaches the parent, before the result
"""


def test_a_protocol_stepping_in_a_tight_loop_gives_hooks_a_few_steps_and_every_boundary(
    rig, make_protocol, make_data
):
    # Finding 4 of the third red team: each of these 9,500 steps was an event
    # for every hook and a line in --events. Made to fail by sending every
    # step from ctx.progress and passing every one on in the parent.
    events: list[Event] = []
    heard: list[Any] = []
    outcome = rig.executor(FakeBackend(rig.runtime()), hooks=(events.append,)).run(
        TaskSpec(protocol_dir=make_protocol(EAGER), data_dir=make_data({"a.csv": "1"})),
        on_progress=heard.append,
    )
    assert outcome.status is Status.OK, outcome.error
    progress = [e.update for e in events if isinstance(e, AlgorithmProgress)]
    assert heard == progress  # the listener gets the same coalesced events
    boundaries = [(u.kind.value, u.current_epoch) for u in progress if u.kind.value != "STEP"]
    assert boundaries == [("RUN_START", 0)] + [
        (k, e) for e in (1, 2, 3) for k in ("EPOCH_START", "EPOCH_END")
    ]
    steps = [u for u in progress if u.kind.value == "STEP"]
    assert len(steps) < 200, f"{len(steps)} of 9500 steps reached the hooks"
    ends = [i for i, u in enumerate(progress) if u.kind.value == "EPOCH_END"]
    for epoch, end in zip((1, 2, 3), ends, strict=True):
        last = progress[end - 1]  # the epoch's last step went on just before its end
        assert (last.kind.value, last.current_epoch, last.current) == ("STEP", epoch, 2999)
    assert (progress[-1].info, progress[-1].current) == ("evaluating", 499)


# -- result rows stream to the database ----------------------------------------------------


def staged(db: ProjectDatabase, task_id: str, batch: int | None = None) -> int:
    """Rows of the task on disk, seen or not (what readers cannot count)."""
    conn = sqlite3.connect(db.path)
    try:
        sql = "SELECT count(*) FROM results WHERE task_id = ?" + (" AND batch = ?" if batch else "")
        return int(conn.execute(sql, (task_id, batch) if batch else (task_id,)).fetchone()[0])
    finally:
        conn.close()


class _LooksBeforeCommits(ProjectDatabase):
    """Notes, as each batch commits, the rows readers see and the rows already on disk."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.at_commit: list[tuple[int, int, int]] = []

    def commit_batch(self, commit: BatchCommit) -> None:
        seen = self.results(commit.project, task_id=commit.task_id, batch=commit.batch)
        self.at_commit.append((commit.batch, len(seen), staged(self, commit.task_id, commit.batch)))
        super().commit_batch(commit)


def test_rows_reach_the_database_while_the_batch_runs_and_are_seen_only_once_it_commits(
    rig, make_protocol, make_data
):
    # Finding 3 of the third red team: the parent held every row of a batch and
    # inserted them all at its end. Made to fail by handing the rows to the
    # database only at the commit (they were then not on disk before it), and
    # by inserting them seen (readers then saw them before the commit).
    data = make_data({"a.csv": "1", "b.csv": "2", "c.csv": "3"})
    db = _LooksBeforeCommits(rig.db_path)
    heard: list[Event] = []
    outcome = rig.executor(FakeBackend(rig.runtime()), db=db, hooks=(heard.append,)).run(
        TaskSpec(
            protocol_dir=make_protocol(PER_FILE),
            data_dir=data,
            project_id=PROJECT,
            task_id="t-stream",
            batch_size=2,
        )
    )
    assert outcome.status is Status.OK, outcome.error
    assert db.at_commit == [(1, 0, 2), (2, 0, 1)]
    assert outcome.saved_rows == 3
    assert [r.row for r in db.results(PROJECT, task_id="t-stream")] == [
        {"file": "a.csv"},
        {"file": "b.csv"},
        {"file": "c.csv"},
    ]
    saved = [e for e in heard if isinstance(e, ResultsSaved)]
    assert [(e.batch, e.rows) for e in saved] == [(1, 2), (2, 1)]
    assert not hasattr(saved[0], "results"), "the event carries the rows again"


def test_the_rows_of_a_batch_that_did_not_end_ok_are_removed_and_never_seen(rig, make_protocol, make_data):
    # Made to fail by removing both discards, after the commit of a batch that
    # did not end OK and at the task's end (its row then stayed on disk, unseen).
    data = make_data({"a.csv": "1", "b.csv": "die"})
    db = rig.db()
    outcome = rig.executor(FakeBackend(rig.runtime()), db=db).run(
        TaskSpec(
            protocol_dir=make_protocol(PER_FILE),
            data_dir=data,
            project_id=PROJECT,
            task_id="t-dies",
            batch_size=1,
        )
    )
    assert outcome.status is Status.ERROR
    assert outcome.saved_rows == 1
    assert [r.row for r in db.results(PROJECT)] == [{"file": "a.csv"}]
    assert (staged(db, "t-dies", 1), staged(db, "t-dies", 2)) == (1, 0)


class _RefusesRows(ProjectDatabase):
    """A database that cannot take rows while the task runs (locked past the wait, say)."""

    def stage_rows(self, task_id: str, batch: int, rows: list[str], **kw: Any) -> None:
        raise ProjectDatabaseError(f"project database {self.path} is locked by another process (waited 10 s)")


CATCHES = """
def run(ctx):
    try:
        ctx.save_results([{"n": 1}])
    except Exception as exc:
        return {"code": exc.code, "message": str(exc)}
    return "saved"
"""


def test_rows_the_database_cannot_take_are_refused_to_the_protocol_as_unavailable(
    rig, make_protocol, make_data, caplog
):
    # Made to fail by letting the store's error escape as an internal error
    # (the protocol then saw INTERNAL, with no reason), and by naming the
    # database's path to the sandbox.
    db = _RefusesRows(rig.db_path)
    outcome = rig.executor(FakeBackend(rig.runtime()), db=db).run(
        TaskSpec(
            protocol_dir=make_protocol(CATCHES),
            data_dir=make_data({"a.csv": "1"}),
            project_id=PROJECT,
            task_id="t-busy",
        )
    )
    assert outcome.status is Status.OK, outcome.error
    assert outcome.result["code"] == "UNAVAILABLE"
    assert "could not store these rows" in outcome.result["message"]
    assert str(rig.db_path) not in outcome.result["message"]
    assert outcome.saved_rows == 0
    assert any("not stored" in r.getMessage() and str(rig.db_path) in r.getMessage() for r in caplog.records)


def test_a_tasks_rows_are_capped_across_its_batches(rig, make_protocol, make_data):
    # The per-batch caps alone let 10 batches write 596 MB. Made to fail by
    # counting rows per batch only (TaskRows._room without the task totals).
    data = make_data({"a.csv": "1", "b.csv": "2", "c.csv": "3", "d.csv": "4"})
    db = rig.db()
    ex = Executor(
        FakeBackend(rig.runtime()),
        policy=POLICY.replace(max_rows=3),
        run_dir=rig.run_dir,
        spool_dir=rig.spool_dir,
        uid_dir=rig.uid_dir,
        db=db,
    )
    rig.executors.append(ex)
    outcome = ex.run(
        TaskSpec(
            protocol_dir=make_protocol(PER_FILE),
            data_dir=data,
            project_id=PROJECT,
            task_id="t-cap",
            batch_size=2,
        )
    )
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert "at most 3 result rows per task, all batches together (3 saved already)" in outcome.error.message
    assert outcome.batches == {"total": 2, "completed": 1, "size": 2}
    assert [r.row for r in db.results(PROJECT)] == [{"file": "a.csv"}, {"file": "b.csv"}]
    assert staged(db, "t-cap") == 2


def test_without_a_database_rows_are_counted_capped_and_kept_nowhere(rig, make_protocol, make_data):
    # Made to fail by skipping the caps when there is no store (the second
    # row was then accepted).
    heard: list[Event] = []
    ex = Executor(
        FakeBackend(rig.runtime()),
        policy=POLICY.replace(max_rows=1),
        run_dir=rig.run_dir,
        spool_dir=rig.spool_dir,
        uid_dir=rig.uid_dir,
        hooks=(heard.append,),
    )
    rig.executors.append(ex)
    outcome = ex.run(
        TaskSpec(protocol_dir=make_protocol(PER_FILE), data_dir=make_data({"a.csv": "1", "b.csv": "2"}))
    )
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert "at most 1 result rows per task" in outcome.error.message
    assert outcome.saved_rows == 0
    (run,) = [e for e in heard if isinstance(e, BatchRun)]
    assert run.statistics["rows"] == 1
