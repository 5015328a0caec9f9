"""What a task ended with: status, result, error and phase timings."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from executor.data.fileoutcomes import MAX_FAILED_FILES_IN_JSON, FileKind


class Status(enum.StrEnum):
    """How a task ended. Only ``OK`` counts as success."""

    OK = "OK"
    ABORT = "ABORT"
    ERROR = "ERROR"
    TIMEOUT = "TIMEOUT"
    CANCELLED = "CANCELLED"
    KILLED = "KILLED"


@dataclass(frozen=True)
class ErrorDetail:
    """Why a task did not end OK.

    Attributes:
        type: The exception type name raised in the sandbox, or a parent-side
            kind such as ``ContainerExited`` or ``OutOfMemory``.
        message: A one-line, human-readable message.
        traceback: A short formatted summary from the sandbox, if any.
        exit_code: The container's exit code, when it exited.
        stderr_tail: The last lines the sandbox wrote to stderr, when useful.
        measured_s: What the supervisor measured against ``limit_s`` when it
            ended the task: the silence for ``HeartbeatTimeout``, the time
            without progress for ``StallTimeout``, the run time for
            ``TimeoutError``.
        limit_s: The limit in seconds that ended the task (heartbeat, boot,
            stall or wall-clock limit; the grace period of a cancel).
        memory_limit_mb: The memory limit an ``OutOfMemory`` sandbox exceeded.
    """

    type: str
    message: str
    traceback: str = ""
    exit_code: int | None = None
    stderr_tail: str = ""
    measured_s: float | None = None
    limit_s: float | None = None
    memory_limit_mb: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used by the CLI's ``--json`` output."""
        out: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.traceback:
            out["traceback"] = self.traceback
        if self.exit_code is not None:
            out["exit_code"] = self.exit_code
        if self.stderr_tail:
            out["stderr_tail"] = self.stderr_tail
        if self.measured_s is not None:
            out["measured_s"] = round(self.measured_s, 6)
        if self.limit_s is not None:
            out["limit_s"] = self.limit_s
        if self.memory_limit_mb is not None:
            out["memory_limit_mb"] = self.memory_limit_mb
        return out


@dataclass(frozen=True)
class Outcome:
    """The result of one task.

    Attributes:
        task_id: The task's identifier.
        status: How it ended.
        result: The protocol's JSON-serialisable return value (``None`` unless OK).
        runtime: The container runtime that isolated it (``runc``, ``runsc``).
        timings: Phase durations in seconds (``create``, ``start`` or ``assign``, ``boot``,
            ``config``, ``load``, ``run``, ``total``); phases not reached are absent.
        error: Why it did not end OK.
        files: Per-file outcomes the protocol reported: datasource-relative
            name -> ``(FileKind, reason)``.
        selection: Which datasource files the parent let the task see, as
            counts: ``total``, ``selected``, ``skipped_processed``,
            ``skipped_failed``, ``over_limit``, ``skipped_unusable`` (see
            :mod:`executor.data.view`).
        batches: For a batched run: ``total`` planned, ``completed`` (ended
            OK and committed) and ``size`` (files per batch).
        saved_rows: Result rows the protocol saved that the parent committed
            to the project database.
        task_hash: The hash the project database keeps the task's files and
            results under.
        warm_starts: How many of the task's containers (one per batch) were
            warm slots of a pool (:mod:`executor.task.warmpool`) rather than cold
            starts; a warm one's timings have ``assign`` instead of
            ``create`` and ``start``.
    """

    task_id: str
    status: Status
    result: Any = None
    runtime: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    error: ErrorDetail | None = None
    files: dict[str, tuple[FileKind, str]] = field(default_factory=dict)
    selection: dict[str, int] | None = None
    batches: dict[str, int] | None = None
    saved_rows: int = 0
    task_hash: str = ""
    warm_starts: int = 0

    @property
    def ok(self) -> bool:
        """Whether the task succeeded."""
        return self.status is Status.OK

    def to_dict(self) -> dict[str, Any]:
        """The stable JSON contract of ``sandbox-executor run --json``."""
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "status": self.status.value,
            "result": self.result,
            "runtime": self.runtime,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }
        if self.error is not None:
            out["error"] = self.error.to_dict()
        if self.files:
            out["files"] = _files_to_dict(self.files)
        if self.task_hash:
            out["task_hash"] = self.task_hash
        if self.selection is not None:
            out["selection"] = dict(self.selection)
        if self.batches is not None:
            out["batches"] = dict(self.batches)
        if self.saved_rows:
            out["saved_rows"] = self.saved_rows
        if self.warm_starts:
            out["warm_starts"] = self.warm_starts
        return out


def _files_to_dict(files: dict[str, tuple[FileKind, str]]) -> dict[str, Any]:
    """Counts always; failed files with reasons up to a cap, the rest counted.

    ``failed_total`` and ``failed_truncated`` appear only when the list was cut,
    so a report within the cap keeps its old shape.
    """
    failed: dict[str, str] = {}
    failed_total = 0
    for name, (kind, reason) in files.items():
        if kind == FileKind.FAILED:
            failed_total += 1
            if failed_total <= MAX_FAILED_FILES_IN_JSON:
                failed[name] = reason
    out: dict[str, Any] = {"processed": len(files) - failed_total, "failed": failed}
    if failed_total > len(failed):
        out["failed_total"] = failed_total
        out["failed_truncated"] = failed_total - len(failed)
    return out
