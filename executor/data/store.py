"""The project store's interface: the records of ledger, file outcomes and results, and the store protocol.

The rest of the executor talks to a :class:`ProjectStore` and never to a
database: the run loop records a task's start and end, stages its result rows,
commits each batch and reads what a task hash already did with its files; the
CLI lists tasks, results and failed files. :func:`executor.data.stores.open_store`
opens one from a path or a URL; :mod:`executor.data.sqlite` (the default) and
:mod:`executor.data.memory` implement it, and one compliance suite holds them
both to the contract written here.

The contract:

* **The ledger.** :meth:`~ProjectStore.start_task` inserts a row RUNNING;
  :meth:`~ProjectStore.end_task` completes it, keeping the log tail's last
  whole lines (:data:`MAX_LOG_TAIL_CHARS`); :meth:`~ProjectStore.close_lost`
  closes as :data:`LOST` the RUNNING rows whose owner is gone.
* **Rows stream in; a batch commits whole.** :meth:`~ProjectStore.stage_rows`
  writes a running batch's result rows, unseen by readers until
  :meth:`~ProjectStore.commit_batch` stores the batch's files, statistics and
  progress, all of it or none. The rows of a batch that never commits are
  removed by :meth:`~ProjectStore.discard_rows`.
* **Refusals change nothing.** Every failure is a one-line
  :class:`~executor.errors.ProjectDatabaseError`, and the store is as it was.

Times are aware datetimes; dictionaries (policy, timings, selection, rows,
statistics) must be JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from executor.data import logtail
from executor.errors import ProjectDatabaseError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from datetime import datetime

    from executor.data.scan import FileStamp

MAX_LOG_TAIL_CHARS = logtail.MAX_CHARS
"""Characters of a task's log tail the ledger keeps (its last whole lines)."""
RUNNING = "RUNNING"
"""A ledger row's status from its start until it ends."""
LOST = "LOST"
"""The status of a row whose executor died before the task ended."""
LOST_ERROR_TYPE = "ParentLost"
LOST_MESSAGE = "the executor running the task stopped (killed or crashed) before it ended"


def _require_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got {value!r}")


def _require_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def check_limit(limit: int | None) -> None:
    """Refuse a listing limit that is not ``None`` or a non-negative int."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a non-negative int, got {limit!r}")


def to_json(value: object) -> str:
    """A record's dictionary as a store keeps it: compact JSON, keys sorted (else ValueError, TypeError)."""
    return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))


def json_object(text: str) -> dict[str, Any]:
    """The dictionary :func:`to_json` kept; an empty one if the text holds anything else."""
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


def stats_json(commit: BatchCommit) -> str:
    """A batch's statistics as :func:`to_json` keeps them.

    Raises:
        ProjectDatabaseError: They are not JSON (checked before anything is written).
    """
    try:
        return to_json(commit.stats)
    except (TypeError, ValueError) as exc:
        reason = " ".join(str(exc).split())
        raise ProjectDatabaseError(
            f"cannot store batch {commit.batch} of task {commit.task_id}: not JSON ({reason})"
        ) from exc


@dataclass(frozen=True)
class TaskStart:
    """A task's ledger row as it starts: what runs, on what, under which policy."""

    task_id: str
    task_hash: str
    project: str
    modeller: str
    datasource: str
    bundle_sha256: str
    policy: dict[str, Any]
    runtime: str
    started_at: datetime
    selection: dict[str, int]
    total_batches: int
    test_run: bool
    owner: str = ""

    def __post_init__(self) -> None:
        if not self.task_id:
            raise ValueError("task_id must not be empty")
        _require_aware("started_at", self.started_at)
        _require_count("total_batches", self.total_batches)


@dataclass(frozen=True)
class TaskEnd:
    """How a task ended: what completes its ledger row."""

    task_id: str
    status: str
    error_type: str | None
    error_message: str | None
    timings: dict[str, Any]
    ended_at: datetime
    log_tail: str
    batches_done: int
    selection: dict[str, int]
    log_format: int = logtail.UNMARKED

    def __post_init__(self) -> None:
        _require_aware("ended_at", self.ended_at)
        _require_count("batches_done", self.batches_done)
        if self.status == RUNNING:
            raise ValueError(f"a task cannot end with status {RUNNING}")


@dataclass(frozen=True)
class FileStates:
    """What a task hash already did with a project's files.

    Attributes:
        processed: name -> (size, mtime_ns) of each file processed OK.
        failed: name -> (reason, attempts) of each file that failed.
        failed_stamps: name -> (size, mtime_ns) of each failed file as it
            was when it last failed (a file changed since is new data).
    """

    processed: dict[str, tuple[int, int]] = field(default_factory=dict)
    failed: dict[str, tuple[str, int]] = field(default_factory=dict)
    failed_stamps: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchCommit:
    """Everything one batch leaves behind, committed together.

    A batch that ended OK commits all of it, and with it the result rows
    staged for it (:meth:`ProjectStore.stage_rows`). One that did not
    (``ok`` false) commits only its failed files, the seed's resilience phase:
    no processed files, and neither a batch row nor a batch done is recorded,
    so its staged rows are never seen and a later run starts that batch's
    files again.

    Attributes:
        batch: 1-based batch number, at most ``total_batches``.
        processed: Files of the batch processed OK.
        failed: Files of the batch that failed, each with its reason.
        record_processed: Whether processed files are recorded (not on a test
            run, so that a later real run still processes them).
        stats: The batch's statistics, stored as JSON.
        ok: Whether the batch ended OK.
    """

    task_id: str
    project: str
    task_hash: str
    batch: int
    total_batches: int
    processed: list[FileStamp]
    failed: list[tuple[FileStamp, str]]
    record_processed: bool
    started_at: datetime
    ended_at: datetime
    stats: dict[str, Any]
    ok: bool = True

    def __post_init__(self) -> None:
        if not self.ok and (self.processed or self.record_processed):
            raise ValueError("a batch that did not end OK commits no processed files")
        if not 1 <= self.batch <= self.total_batches:
            raise ValueError(f"batch {self.batch} is not in 1..{self.total_batches}")
        _require_aware("started_at", self.started_at)
        _require_aware("ended_at", self.ended_at)
        names = [f.name for f in self.processed] + [f.name for f, _ in self.failed]
        if len(set(names)) != len(names):
            raise ValueError("a file is named twice among a batch's processed and failed files")


@dataclass(frozen=True)
class ResultRecord:
    """One stored result row."""

    task_id: str
    task_hash: str
    batch: int
    row: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class FailedFileRecord:
    """One file that failed under a task hash, with its latest reason."""

    task_hash: str
    name: str
    reason: str
    attempts: int
    last_task_id: str
    updated_at: datetime


@dataclass(frozen=True)
class TaskRecord:
    """One ledger row, decoded."""

    task_id: str
    task_hash: str
    project: str
    modeller: str
    datasource: str
    bundle_sha256: str
    policy: dict[str, Any]
    runtime: str
    status: str
    error_type: str | None
    error_message: str | None
    timings: dict[str, Any]
    selection: dict[str, int]
    total_batches: int
    batches_done: int
    test_run: bool
    started_at: datetime
    ended_at: datetime | None
    log_tail: str
    log_format: int = logtail.UNMARKED

    def log_lines(self) -> list[logtail.TailLine]:
        """The log tail's lines, each with its stream and batch (both ``None`` in an unmarked tail)."""
        return logtail.parse(self.log_tail, self.log_format)


class ProjectStore(Protocol):
    """Where a pod keeps its ledger, file outcomes and results; one instance is shared by threads.

    Every method is one all-or-nothing step; every refusal raises a one-line
    :class:`~executor.errors.ProjectDatabaseError` and changes nothing.
    """

    busy_timeout_s: float
    """How long an operation waits for another writer before it gives up."""

    def start_task(self, record: TaskStart) -> None:
        """Insert a task's ledger row with status RUNNING; refused if the id is already recorded."""
        ...

    def end_task(self, end: TaskEnd) -> None:
        """Complete a task's ledger row (tail cut to :data:`MAX_LOG_TAIL_CHARS`); refused if never started."""
        ...

    def close_lost(self, alive: Callable[[str], bool]) -> list[str]:
        """Close as :data:`LOST` the RUNNING rows of owners ``alive`` says are gone; their task ids.

        Rows without an owner are left alone. The rows the lost tasks staged
        for batches that never committed are removed.
        """
        ...

    def file_states(self, project: str, task_hash: str) -> FileStates:
        """The files ``task_hash`` processed OK and those that failed, in ``project``."""
        ...

    def stage_rows(
        self, task_id: str, batch: int, rows: Sequence[str], *, timeout_s: float | None = None
    ) -> None:
        """Write result rows (JSON texts, in order) of a running batch, unseen until it commits; all or none.

        Refused if the task is not RUNNING, the batch is not in
        ``1..total_batches`` of it, or already committed.
        """
        ...

    def discard_rows(self, task_id: str, batch: int | None = None) -> int:
        """Remove the rows a task (one batch, if given) staged for batches never committed; how many."""
        ...

    def commit_batch(self, commit: BatchCommit) -> None:
        """Store a batch's files, its batch record and the ledger's progress, all or nothing.

        Refused if the task was never started, the batch is already
        committed, or the statistics are not JSON. A processed file (when
        ``record_processed``) leaves the failed files; a failed one leaves the
        processed files and counts one more attempt. A batch not ``ok``
        stores its failed files only, and its rows stay unseen.
        """
        ...

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
        ...

    def failed_files(self, project: str, task_hash: str | None = None) -> list[FailedFileRecord]:
        """Files that failed in ``project`` (under one task hash if given), by task hash and name."""
        ...

    def tasks(self, project: str | None = None, *, limit: int | None = None) -> list[TaskRecord]:
        """Ledger rows (of one project if given), newest first, at most ``limit``."""
        ...


__all__ = [
    "LOST",
    "LOST_MESSAGE",
    "MAX_LOG_TAIL_CHARS",
    "RUNNING",
    "BatchCommit",
    "FailedFileRecord",
    "FileStates",
    "ProjectStore",
    "ResultRecord",
    "TaskEnd",
    "TaskRecord",
    "TaskStart",
]
