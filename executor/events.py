"""Typed events of a task, for the CLI's display, the caller's callbacks and hooks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from executor.outcome import Status


class ProgressKind(enum.StrEnum):
    """What a progress event says (the names of ``executor.v1.ProgressEvent.Kind``)."""

    RUN_START = "RUN_START"
    RUN_END = "RUN_END"
    EPOCH_START = "EPOCH_START"
    EPOCH_END = "EPOCH_END"
    STEP = "STEP"


@dataclass(frozen=True)
class ProgressUpdate:
    """A progress event from the protocol, for progress bars and hooks."""

    kind: ProgressKind
    current_epoch: int = 0
    max_epochs: int = 0
    current: int = 0
    total: int = 0
    info: str = ""


@dataclass(frozen=True)
class FinishReport:
    """The terminal report a sandbox sent (or the parent made for it: ``RpcAbuse``)."""

    status: Status
    result: Any
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    timings: dict[str, float] = field(default_factory=dict)
