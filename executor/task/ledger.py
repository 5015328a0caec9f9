"""What a task leaves in the project database: its ledger row, its batches' commits, its result rows.

A batch's result rows stream to the database as they arrive, unseen until the
batch commits (:mod:`executor.data.resultrows`). A batch that ends OK commits
its processed and failed files in one transaction that also makes its rows
seen; one that does not commits only the failures it reported and its rows
are removed. A test run touches no file state. Without a database nothing is
recorded and every method here does nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from executor.data import logtail
from executor.data.fileoutcomes import FileKind
from executor.data.resultrows import STORE_WAIT_S, TaskRows
from executor.data.store import BatchCommit, TaskEnd, TaskStart
from executor.errors import ProjectDatabaseError
from executor.outcome import ErrorDetail, Outcome, Status

if TYPE_CHECKING:
    from executor.data.scan import FileStamp
    from executor.data.store import ProjectStore
    from executor.policy import IsolationPolicy
    from executor.spec import TaskSpec
    from executor.task.plan import Plan

log = logging.getLogger(__name__)

REASON_UNRECORDED = "NotRecorded"
"""The TASK_ABORT reason when the parent could not commit what a batch did."""


@dataclass
class BatchResult:
    """What one batch's sandbox did, as the parent saw it."""

    outcome: Outcome
    rows: int  # result rows stored (unseen until the batch commits)
    files: dict[str, tuple[FileKind, str]]
    missing: frozenset[str]
    started_at: datetime
    ended_at: datetime

    @property
    def failed(self) -> dict[str, str]:
        """The files the sandbox reported failed, with their reasons."""
        return {n: r for n, (k, r) in self.files.items() if k is FileKind.FAILED}


def batch_statistics(batch: tuple[FileStamp, ...], done: BatchResult) -> dict[str, Any]:
    """What a batch did, for its BatchRun event and its database row."""
    failed = done.failed
    return {
        "status": done.outcome.status.value,
        "files": len(batch),
        "failed": len(failed),
        "processed": len(batch) - len(failed) - len(done.missing) if done.outcome.ok else 0,
        "missing": len(done.missing),
        "rows": done.rows,
        "duration_s": (done.ended_at - done.started_at).total_seconds(),
    }


def unrecorded(outcome: Outcome, number: int, exc: ProjectDatabaseError) -> Outcome:
    """The batch's outcome when its commit failed: an error, since what ran is not on record."""
    return dataclasses.replace(
        outcome,
        status=Status.ERROR,
        result=None,
        error=ErrorDetail(
            "ProjectDatabaseError",
            f"batch {number} ran but could not be recorded in the project database: {exc}",
        ),
    )


class TaskLedger:
    """One task's rows in ``db`` (``None``: nothing is recorded).

    Args:
        db: The project database, or ``None``.
        spec: The task.
        task_id: The task's id.
        task_hash: The task's hash (its file states are kept under it).
        policy: The task's policy (its caps on result rows).
        plan: The task's selection and batches.
    """

    def __init__(
        self,
        db: ProjectStore | None,
        spec: TaskSpec,
        task_id: str,
        task_hash: str,
        policy: IsolationPolicy,
        plan: Plan,
    ) -> None:
        self.db = db
        self.spec = spec
        self.task_id = task_id
        self.task_hash = task_hash
        self.plan = plan
        store = None
        if db is not None:
            wait = min(db.busy_timeout_s, STORE_WAIT_S)

            def store(batch: int, rows: list[str]) -> None:
                db.stage_rows(task_id, batch, rows, timeout_s=wait)

        self.rows = TaskRows(
            max_rows=policy.max_rows, max_bytes=policy.max_rows_bytes, store=store, task_id=task_id
        )
        """The task's result rows across its batches: its caps, and the database they stream to."""

    def start(self, start: TaskStart) -> None:
        """Open the task's ledger row."""
        if self.db is not None:
            self.db.start_task(start)

    def commit(self, number: int, batch: tuple[FileStamp, ...], done: BatchResult) -> int:
        """Commit the batch (all of it if OK, else its failures only); the rows committed.

        A test run touches no file state (neither processed nor failed), so a
        later real run sees every file as it would have without the trial.

        Raises:
            ProjectDatabaseError: The commit failed (the batch's rows are removed).
        """
        db = self.db
        if db is None:
            return 0
        ok = done.outcome.ok
        trial = self.spec.flags.test_run
        failed = done.failed
        stamps = {f.name: f for f in batch}
        processed = [f for f in batch if f.name not in failed and f.name not in done.missing]
        commit = BatchCommit(
            task_id=self.task_id,
            project=self.spec.project_id,
            task_hash=self.task_hash,
            batch=number,
            total_batches=len(self.plan.batches),
            processed=processed if ok and not trial else [],
            failed=[] if trial else [(stamps[n], reason) for n, reason in failed.items() if n in stamps],
            record_processed=ok and not trial,
            ok=ok,
            started_at=done.started_at,
            ended_at=done.ended_at,
            stats=batch_statistics(batch, done),
        )
        try:
            db.commit_batch(commit)
        except ProjectDatabaseError:
            if done.rows:
                self._discard_rows(number)  # it never commits: its rows are never seen
            raise
        if done.rows and not ok:
            self._discard_rows(number)
        return done.rows if ok else 0

    def _discard_rows(self, number: int) -> None:
        """Remove a batch's rows that will never be seen; they stay unseen if that fails too."""
        assert self.db is not None
        try:
            self.db.discard_rows(self.task_id, number)
        except ProjectDatabaseError as exc:
            log.warning("task %s: the unseen result rows of batch %d stay: %s", self.task_id, number, exc)

    def end(
        self,
        status: Status,
        error: ErrorDetail | None,
        timings: dict[str, float],
        batches_done: int,
        log_tail: str,
    ) -> None:
        """Close the task's ledger row; rows of a batch cut short are removed."""
        db = self.db
        if db is None:
            return
        db.end_task(
            TaskEnd(
                task_id=self.task_id,
                status=status.value,
                error_type=error.type if error is not None else None,
                error_message=error.message if error is not None else None,
                timings=dict(timings),
                ended_at=datetime.now(UTC),
                log_tail=log_tail,
                log_format=logtail.FORMAT,
                batches_done=batches_done,
                selection=self.plan.selection.counts(),
            )
        )
        if self.rows.rows:
            # Rows of a batch cut short (the engine failed, a second Ctrl-C) never commit.
            try:
                db.discard_rows(self.task_id)
            except ProjectDatabaseError as exc:
                log.warning("task %s: its unseen result rows stay: %s", self.task_id, exc)
