"""Typed events of a task, for the CLI's display, the caller's callbacks and hooks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ProgressUpdate:
    """A progress event from the protocol, for progress bars and hooks."""

    kind: str
    current_epoch: int = 0
    max_epochs: int = 0
    current: int = 0
    total: int = 0
    info: str = ""


@dataclass(frozen=True)
class FinishReport:
    """The terminal report a sandbox sent."""

    status: str
    result: Any
    error_type: str = ""
    error_message: str = ""
    traceback: str = ""
    timings: dict[str, float] = field(default_factory=dict)
