"""An in-memory project store: the :class:`~executor.data.store.ProjectStore` contract in a process's memory.

For unit tests where a real database is not the point, and for ``memory:``
(:func:`executor.data.stores.open_store`). Nothing outlives the instance; one
lock serialises its operations, so threads may share it. It keeps what the
SQLite store keeps (dictionaries as JSON text, times in UTC) and refuses what
it refuses, with the same one-line errors.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from executor.data import logtail
from executor.data.store import (
    LOST,
    LOST_ERROR_TYPE,
    LOST_MESSAGE,
    RUNNING,
    BatchCommit,
    FailedFileRecord,
    FileStates,
    ResultRecord,
    TaskEnd,
    TaskRecord,
    TaskStart,
    check_limit,
    json_object,
    stats_json,
    to_json,
)
from executor.errors import ProjectDatabaseError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


@dataclass
class _Task:
    """A ledger row as kept: the record, its dictionaries as JSON text, and its owner."""

    record: TaskRecord
    policy: str
    timings: str
    selection: str
    owner: str


@dataclass(frozen=True)
class _Row:
    task_id: str
    project: str
    task_hash: str
    batch: int
    text: str
    created_at: datetime


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


class MemoryStore:
    """A project store held in memory; empty when made.

    Args:
        busy_timeout_s: Kept for the contract: no other writer ever holds this store long.
    """

    def __init__(self, *, busy_timeout_s: float = 10.0) -> None:
        self.busy_timeout_s = busy_timeout_s
        self.where = "the in-memory project store"
        self._lock = threading.Lock()
        self._tasks: dict[str, _Task] = {}  # in the order they started
        self._rows: list[_Row] = []  # in the order they were staged
        self._batches: set[tuple[str, int]] = set()  # (task_id, batch) committed OK
        self._processed: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}
        self._failed: dict[tuple[str, str], dict[str, FailedFileRecord]] = {}
        self._failed_stamps: dict[tuple[str, str], dict[str, tuple[int, int]]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._tasks)} tasks)"

    # -- the ledger ----------------------------------------------------------

    def start_task(self, record: TaskStart) -> None:
        """Insert a task's ledger row with status RUNNING; refused if the id is already recorded."""
        r = record
        policy, selection = to_json(r.policy), to_json(r.selection)
        with self._lock:
            if r.task_id in self._tasks:
                raise ProjectDatabaseError(f"task {r.task_id} is already recorded in {self.where}")
            row = TaskRecord(
                task_id=r.task_id,
                task_hash=r.task_hash,
                project=r.project,
                modeller=r.modeller,
                datasource=r.datasource,
                bundle_sha256=r.bundle_sha256,
                policy={},
                runtime=r.runtime,
                status=RUNNING,
                error_type=None,
                error_message=None,
                timings={},
                selection={},
                total_batches=r.total_batches,
                batches_done=0,
                test_run=r.test_run,
                started_at=_utc(r.started_at),
                ended_at=None,
                log_tail="",
            )
            self._tasks[r.task_id] = _Task(row, policy, "{}", selection, r.owner)

    def close_lost(self, alive: Callable[[str], bool]) -> list[str]:
        """Close as LOST the RUNNING rows of owners that are gone (never unowned ones); their task ids."""
        with self._lock:
            running = [(t.record.task_id, t.owner) for t in self._tasks.values() if self._running_owned(t)]
        lost = [task_id for task_id, owner in running if not alive(owner)]
        ended = datetime.now(UTC)
        with self._lock:
            for task_id in lost:
                task = self._tasks[task_id]
                if task.record.status == RUNNING:
                    task.record = replace(
                        task.record,
                        status=LOST,
                        error_type=LOST_ERROR_TYPE,
                        error_message=LOST_MESSAGE,
                        ended_at=ended,
                    )
        for task_id in lost:
            self.discard_rows(task_id)
        return lost

    @staticmethod
    def _running_owned(task: _Task) -> bool:
        return task.record.status == RUNNING and task.owner != ""

    def end_task(self, end: TaskEnd) -> None:
        """Complete a task's ledger row, the tail cut to its last whole lines; refused if never started."""
        e = end
        timings, selection = to_json(e.timings), to_json(e.selection)
        with self._lock:
            task = self._tasks.get(e.task_id)
            if task is None:
                raise ProjectDatabaseError(f"task {e.task_id} was never started in {self.where}")
            task.record = replace(
                task.record,
                status=e.status,
                error_type=e.error_type,
                error_message=e.error_message,
                ended_at=_utc(e.ended_at),
                log_tail=logtail.cut(e.log_tail, logtail.MAX_CHARS),
                log_format=e.log_format,
                batches_done=e.batches_done,
            )
            task.timings, task.selection = timings, selection

    # -- files and results -----------------------------------------------------

    def file_states(self, project: str, task_hash: str) -> FileStates:
        """The files ``task_hash`` processed OK and those that failed, in ``project``."""
        key = (project, task_hash)
        with self._lock:
            failed = self._failed.get(key, {})
            return FileStates(
                processed=dict(self._processed.get(key, {})),
                failed={name: (f.reason, f.attempts) for name, f in failed.items()},
                failed_stamps=dict(self._failed_stamps.get(key, {})),
            )

    def stage_rows(
        self, task_id: str, batch: int, rows: Sequence[str], *, timeout_s: float | None = None
    ) -> None:
        """Keep result rows of a running batch, unseen until it commits; all or none (see the protocol)."""
        if not rows:
            return
        created = datetime.now(UTC)
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.record.status != RUNNING:
                raise ProjectDatabaseError(
                    f"cannot save result rows: task {task_id} is not running in {self.where}"
                )
            r = task.record
            if not 1 <= batch <= r.total_batches:
                raise ProjectDatabaseError(
                    f"cannot save result rows: batch {batch} is not in 1..{r.total_batches} of task {task_id}"
                )
            if (task_id, batch) in self._batches:
                raise ProjectDatabaseError(
                    f"cannot save result rows: batch {batch} of task {task_id} is already committed"
                )
            self._rows.extend(_Row(task_id, r.project, r.task_hash, batch, text, created) for text in rows)

    def discard_rows(self, task_id: str, batch: int | None = None) -> int:
        """Remove the rows a task (one batch, if given) staged for batches never committed; how many."""

        def doomed(row: _Row) -> bool:
            return (
                row.task_id == task_id
                and (batch is None or row.batch == batch)
                and (row.task_id, row.batch) not in self._batches
            )

        with self._lock:
            kept = [row for row in self._rows if not doomed(row)]
            removed = len(self._rows) - len(kept)
            self._rows = kept
        return removed

    def commit_batch(self, commit: BatchCommit) -> None:
        """Store a batch's files, batch record and progress, all or nothing (see the protocol)."""
        c = commit
        stats_json(c)  # refused before anything is stored; kept nowhere else here
        where = f"cannot commit batch {c.batch} of task {c.task_id} to {self.where}"
        now = datetime.now(UTC)
        key = (c.project, c.task_hash)
        with self._lock:
            task = self._tasks.get(c.task_id)
            if task is None:
                raise ProjectDatabaseError(f"{where}: task {c.task_id} was never started")
            if c.ok and (c.task_id, c.batch) in self._batches:
                raise ProjectDatabaseError(f"{where}: the batch is already committed")
            processed = self._processed.setdefault(key, {})
            failed = self._failed.setdefault(key, {})
            stamps = self._failed_stamps.setdefault(key, {})
            if c.record_processed:
                for f in c.processed:
                    processed[f.name] = (f.size, f.mtime_ns)
                    failed.pop(f.name, None)
                    stamps.pop(f.name, None)
            for f, reason in c.failed:
                before = failed.get(f.name)
                failed[f.name] = FailedFileRecord(
                    task_hash=c.task_hash,
                    name=f.name,
                    reason=reason,
                    attempts=1 if before is None else before.attempts + 1,
                    last_task_id=c.task_id,
                    updated_at=now,
                )
                stamps[f.name] = (f.size, f.mtime_ns)
                processed.pop(f.name, None)
            if c.ok:
                self._batches.add((c.task_id, c.batch))
                task.record = replace(task.record, batches_done=task.record.batches_done + 1)

    # -- reading -------------------------------------------------------------

    def results(
        self,
        project: str,
        task_hash: str | None = None,
        *,
        limit: int | None = None,
        task_id: str | None = None,
        batch: int | None = None,
    ) -> list[ResultRecord]:
        """Committed result rows of ``project``, oldest first, at most ``limit``, narrowed as asked."""
        check_limit(limit)
        with self._lock:
            found = [
                row
                for row in self._rows
                if row.project == project
                and (row.task_id, row.batch) in self._batches
                and task_hash in (None, row.task_hash)
                and task_id in (None, row.task_id)
                and batch in (None, row.batch)
            ]
        return [
            ResultRecord(r.task_id, r.task_hash, r.batch, json.loads(r.text), r.created_at)
            for r in found[:limit]
        ]

    def failed_files(self, project: str, task_hash: str | None = None) -> list[FailedFileRecord]:
        """Files that failed in ``project`` (under one task hash if given), by task hash and name."""
        with self._lock:
            found = [
                record
                for (p, th), by_name in self._failed.items()
                if p == project and task_hash in (None, th)
                for record in by_name.values()
            ]
        return sorted(found, key=lambda f: (f.task_hash, f.name))

    def tasks(self, project: str | None = None, *, limit: int | None = None) -> list[TaskRecord]:
        """Ledger rows (of one project if given), newest first, at most ``limit``."""
        check_limit(limit)
        with self._lock:
            found = [
                replace(
                    t.record,
                    policy=json_object(t.policy),
                    timings=json_object(t.timings),
                    selection=json_object(t.selection),
                )
                for t in self._tasks.values()
                if project in (None, t.record.project)
            ]
        # Newest first; of two started at once, the later recorded first.
        found.reverse()
        found.sort(key=lambda t: t.started_at, reverse=True)
        return found[:limit]
