"""What a task is, as the pod orchestrator describes it: :class:`TaskSpec` and its groups."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executor.errors import ConfigurationError
from executor.mailbox.crypto import TaskKeys

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_UINT64_MAX = 2**64 - 1


@dataclass(frozen=True)
class TaskFlags:
    """How the protocol should run over the data (``executor.v1.Flags``)."""

    batched_execution: bool = False
    test_run: bool = False
    run_on_new_data_only: bool = False
    force_rerun_failed_files: bool = False

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, bool):
                raise ConfigurationError(f"flags.{name}: expected true or false, got {value!r}")


@dataclass(frozen=True)
class InferenceLimits:
    """Caps on what an inference run reads (``executor.v1.InferenceLimits``); 0 means no limit."""

    max_files: int = 0
    max_batches: int = 0

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _UINT64_MAX:
                raise ConfigurationError(
                    f"inference_limits.{name}: expected a whole number from 0 (no limit), got {value!r}"
                )


@dataclass(frozen=True)
class TaskSpec:
    """One task as the pod orchestrator describes it.

    Mirrors the seed's worker configuration where that makes sense for a
    container. ``keys`` (the task's AES key, this pod's RSA key and the peers'
    public keys) stay in the parent, which does all mailbox crypto; they are
    never part of what the sandbox fetches. Without keys a fresh task key is
    made, which suits a task with no real modeller.
    """

    protocol_dir: Path
    data_dir: Path
    project_id: str = "default"
    task_id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    modeller_name: str = ""
    pod_identifier: str = ""
    pod_identifiers: tuple[str, ...] = ()
    datasource_name: str = ""
    schema: dict[str, Any] = field(default_factory=dict)
    serialized_protocol: bytes = b""
    flags: TaskFlags = TaskFlags()
    inference_limits: InferenceLimits = InferenceLimits()
    model_urls: dict[str, str] = field(default_factory=dict)
    task_hash: str = ""
    username: str = ""
    keys: TaskKeys | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.flags, TaskFlags):
            raise ConfigurationError(f"flags: expected a TaskFlags, got {type(self.flags).__name__}")
        if not isinstance(self.inference_limits, InferenceLimits):
            raise ConfigurationError(
                f"inference_limits: expected an InferenceLimits, got {type(self.inference_limits).__name__}"
            )
        for name in ("project_id", "task_id"):
            value = getattr(self, name)
            if value is not None and not _ID_RE.fullmatch(value):
                raise ConfigurationError(
                    f"{name}: expected 1-64 letters, digits, '.', '_' or '-', got {value!r}"
                )
        try:
            json.dumps(self.parameters, allow_nan=False)
            json.dumps(self.schema, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"parameters and schema must be JSON-serialisable: {exc}") from None
