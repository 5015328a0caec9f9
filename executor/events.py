"""Typed events of a task: progress and finish for display and hooks, controls for the sandbox."""

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
