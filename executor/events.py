"""Every typed event of a task, in one module: what hooks, listeners and the sandbox's server pass around.

Each event a hook receives is a frozen dataclass carrying the task it is
about (:class:`TaskContext`) and an aware UTC time, with a ``to_dict()`` that
is ready for ``json.dumps``. Those the sandbox reports (:class:`Report`:
progress, and whatever comes next) are one type from the wire to the hook:
the server's serde makes them, the session checks them, the run loop binds
them to their task and batch and hands them on. Besides: :class:`Control`
(parent to sandbox) and :class:`FinishReport` (the sandbox's end).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Self

from executor.data.fileoutcomes import MAX_FAILED_FILES_IN_JSON
from executor.sandbox.contract import MAX_COLUMN_NAME_CHARS, MAX_INFO_CHARS, ReportCase, is_column_name

if TYPE_CHECKING:
    from executor.outcome import Outcome, Status


class ProgressKind(enum.StrEnum):
    """What a progress event says (the names of ``executor.v1.ProgressEvent.Kind``)."""

    RUN_START = "RUN_START"
    RUN_END = "RUN_END"
    EPOCH_START = "EPOCH_START"
    EPOCH_END = "EPOCH_END"
    STEP = "STEP"


PROGRESS_KINDS = frozenset(ProgressKind)


class ControlKind(enum.StrEnum):
    """What the parent tells the sandbox down the heartbeat stream (``executor.v1.Control.Kind``)."""

    MODELLER_READY = "MODELLER_READY"
    CANCEL = "CANCEL"
    BEAT_SEEN = "BEAT_SEEN"


@dataclass(frozen=True)
class Control:
    """A control message queued for the sandbox; :mod:`executor.rpc.serde` makes the protobuf."""

    kind: ControlKind
    reason: str = ""


@dataclass(frozen=True)
class FinishReport:
    """The terminal report a sandbox sent (or the parent made for it: ``RpcAbuse``)."""

    status: Status
    result: Any
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    timings: dict[str, float] = field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class TaskContext:
    """Which task an event is about: the fields every event carries."""

    task_id: str
    task_hash: str
    project: str
    modeller: str
    datasource: str

    def to_dict(self) -> dict[str, str]:
        """The context's fields, as every event's JSON form has them at its top level."""
        return {
            "task_id": self.task_id,
            "task_hash": self.task_hash,
            "project": self.project,
            "modeller": self.modeller,
            "datasource": self.datasource,
        }


UNBOUND = TaskContext(task_id="", task_hash="", project="", modeller="", datasource="")
"""The context of a report not yet bound to its task (it has just come off the wire)."""


@dataclass(frozen=True, kw_only=True)
class Event:
    """Base of the typed events: the task, an aware UTC time, and the JSON form.

    Attributes:
        task: The task the event is about.
        time: When it happened (aware; normalised to UTC). Defaults to now.
    """

    event: ClassVar[str] = "event"

    task: TaskContext
    time: datetime = field(default_factory=_now)

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise ValueError(f"{type(self).__name__}.time must be timezone-aware, got {self.time!r}")
        object.__setattr__(self, "time", self.time.astimezone(UTC))

    def to_dict(self) -> dict[str, Any]:
        """``{"event": name, "time": ISO 8601, task fields..., event fields...}``."""
        return {"event": self.event, "time": self.time.isoformat(), **self.task.to_dict(), **self._fields()}

    def _fields(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True, kw_only=True)
class TaskStarted(Event):
    """The task's files are selected and split into batches; the first batch is about to run.

    Attributes:
        selection: The selection counts (``total``, ``selected``, ``skipped_processed``,
            ``skipped_failed``, ``over_limit``, ``skipped_unusable``).
        total_batches: How many batches the selection was split into.
        runtime: The container runtime isolating it (``runc``, ``runsc``).
    """

    event: ClassVar[str] = "task_started"

    selection: dict[str, int]
    total_batches: int
    runtime: str

    def _fields(self) -> dict[str, Any]:
        return {
            "selection": dict(self.selection),
            "total_batches": self.total_batches,
            "runtime": self.runtime,
        }


@dataclass(frozen=True, kw_only=True)
class Report(Event):
    """An event the sandbox reported: one case of the Report call (``case``), made once by the wire's serde.

    The parent's server makes it unbound (no task yet: it knows only the
    report); the run loop binds it to its task and batch (:meth:`bound`) and
    hands it to the hooks as it is, whatever its kind. A subclass names its
    ``case`` (a :class:`~executor.sandbox.contract.ReportCase`) and is found
    by it in :data:`REPORTS`; its :meth:`check` refuses a value no protocol
    may report (the session answers with the refusal).

    Attributes:
        batch: The batch (1-based) whose sandbox reported it; 0 until bound.
    """

    case: ClassVar[str] = ""

    task: TaskContext = field(default_factory=lambda: UNBOUND)
    batch: int = 0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.case:
            REPORTS[cls.case] = cls

    def check(self) -> None:
        """Refuse what no protocol may report.

        Raises:
            ValueError: Why, in words fit for the sandbox.
        """

    def bound(self, task: TaskContext, batch: int) -> Self:
        """The same report, bound to the task and the batch that made it."""
        return dataclasses.replace(self, task=task, batch=batch)


REPORTS: dict[str, type[Report]] = {}
"""The report event of each case of the Report call, by case name (filled as each class is defined)."""


def _check_text(what: str, text: str) -> None:
    """Refuse text with a lone surrogate: no strict JSON parser or UTF-8 terminal accepts it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} holds a lone surrogate") from None


@dataclass(frozen=True)
class AlgorithmProgress(Report):
    """A progress report from the protocol: run start/end, epoch start/end, a step.

    One type from the wire to the hooks: the server's session checks it, the
    ``on_progress`` listener of :meth:`executor.runner.Executor.run` and the
    hooks get it (bound to its task and batch). ``ProgressUpdate`` is its
    other name.

    Attributes:
        kind: What the protocol reported.
        current_epoch, max_epochs: The epoch (1-based) and how many there are.
        current, total: A step's units done and in all.
        info: A short note of the protocol's (hostile text: escape it to print).
        min_epochs: The seed's ``min_epochs`` (its training loop's minimum
            epochs before early stopping may end training). The sandbox's
            progress contract carries no such number, so it is ``None`` unless
            the parent knows it.
    """

    event: ClassVar[str] = "algorithm_progress"
    case: ClassVar[str] = ReportCase.PROGRESS

    kind: ProgressKind
    current_epoch: int = 0
    max_epochs: int = 0
    current: int = 0
    total: int = 0
    info: str = ""
    min_epochs: int | None = None

    def check(self) -> None:
        """Refuse a kind no protocol may report, and info past the contract's cap or not text."""
        if self.kind not in PROGRESS_KINDS:
            raise ValueError("unknown progress event kind")
        if len(self.info) > MAX_INFO_CHARS:
            raise ValueError(f"progress info exceeds {MAX_INFO_CHARS} characters")
        _check_text("progress info", self.info)

    @property
    def update(self) -> AlgorithmProgress:
        """The progress itself (an ``AlgorithmProgress`` once carried its update apart)."""
        return self

    def _fields(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value.lower(),
            "batch": self.batch,
            "current_epoch": self.current_epoch,
            "min_epochs": self.min_epochs,
            "max_epochs": self.max_epochs,
            "current": self.current,
            "total": self.total,
            "info": self.info,
        }


ProgressUpdate = AlgorithmProgress
"""The name the ``on_progress`` listener's argument has always had: the same type."""


@dataclass(frozen=True)
class Metric(Report):
    """A named number the protocol measured (a loss, an accuracy), sent with ``ctx.report("metric", ...)``.

    Attributes:
        name: What was measured: 1 to 128 characters, no control character
            (the contract's rule for a result column's name).
        value: The number, finite.
    """

    event: ClassVar[str] = "metric"
    case: ClassVar[str] = ReportCase.METRIC

    name: str
    value: float

    def check(self) -> None:
        """Refuse a name that could not name a column, and a value that is not a finite number."""
        if not is_column_name(self.name):
            raise ValueError(
                f"a metric name must be 1 to {MAX_COLUMN_NAME_CHARS} characters "
                "free of control characters and lone surrogates"
            )
        if not math.isfinite(self.value):
            raise ValueError("a metric value must be a finite number")

    def _fields(self) -> dict[str, Any]:
        return {"batch": self.batch, "name": self.name, "value": self.value}


@dataclass(frozen=True, kw_only=True)
class BatchRun(Event):
    """A batch ended: the seed's ``ProtocolTaskBatchRun`` statistics.

    Attributes:
        datasource_name: The datasource the batch read.
        statistics: What the batch did (JSON values).
        batch_number: The batch (1-based).
        total_batches: How many batches the task has.
    """

    event: ClassVar[str] = "batch_run"

    datasource_name: str
    statistics: dict[str, Any]
    batch_number: int
    total_batches: int

    def _fields(self) -> dict[str, Any]:
        return {
            "datasource_name": self.datasource_name,
            "statistics": dict(self.statistics),
            "batch_number": self.batch_number,
            "total_batches": self.total_batches,
        }


@dataclass(frozen=True, kw_only=True)
class ResultsSaved(Event):
    """A batch's result rows are committed to the project database.

    The rows themselves are not carried (a batch may hold 32 MiB of them): a
    hook that keeps them elsewhere reads them back with
    ``ProjectDatabase.results(event.task.project, task_id=event.task.task_id,
    batch=event.batch)``.

    Attributes:
        batch: The batch (1-based).
        rows: How many rows were committed.
    """

    event: ClassVar[str] = "results_saved"

    batch: int
    rows: int

    def _fields(self) -> dict[str, Any]:
        return {"batch": self.batch, "rows": self.rows}


@dataclass(frozen=True, kw_only=True)
class FailedFilesSaved(Event):
    """The task's failed files are recorded (the seed's resilience phase, at the end of the run).

    Attributes:
        files: Datasource-relative name -> reason.
    """

    event: ClassVar[str] = "failed_files_saved"

    files: dict[str, str]

    def _fields(self) -> dict[str, Any]:
        listed: dict[str, str] = {}
        for name, reason in self.files.items():
            if len(listed) == MAX_FAILED_FILES_IN_JSON:
                break
            listed[name] = reason
        out: dict[str, Any] = {"total": len(self.files), "files": listed}
        if len(self.files) > len(listed):
            out["truncated"] = len(self.files) - len(listed)
        return out


@dataclass(frozen=True, kw_only=True)
class LogLine(Event):
    """One line the sandbox wrote, after the parent's caps (:mod:`executor.task.output`).

    Attributes:
        stream: ``stdout``, ``stderr``, or ``executor`` for the parent's own
            notes (output dropped by a cap, the task's event total reached).
        line: The line, without its newline; hostile text (escape it to print).
        batch: The batch (1-based) whose container wrote it.
    """

    event: ClassVar[str] = "log_line"

    stream: str
    line: str
    batch: int

    def _fields(self) -> dict[str, Any]:
        return {"stream": self.stream, "line": self.line, "batch": self.batch}


@dataclass(frozen=True, kw_only=True)
class TaskEnded(Event):
    """The task ended; ``outcome`` is what :meth:`Executor.run` returns."""

    event: ClassVar[str] = "task_ended"

    outcome: Outcome

    def _fields(self) -> dict[str, Any]:
        return {"outcome": self.outcome.to_dict()}
