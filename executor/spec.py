"""What a task is, as the pod orchestrator describes it: :class:`TaskSpec` and its groups."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from executor.errors import ConfigurationError

if TYPE_CHECKING:
    from pathlib import Path

    from executor.mailbox.crypto import TaskKeys

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_HASH_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_UINT64_MAX = 2**64 - 1
DEFAULT_BATCH_SIZE = 16
"""Files per batch when a task asks for batched execution without a size (the seed's default)."""
MAX_BATCH_SIZE = 1_000_000


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

    ``task_hash`` names the task's definition in the project database: files
    processed, failed and results are kept per task hash. Empty means a hash of
    the protocol bundle and its parameters. ``batch_size`` (files per batch)
    runs the task in batches, one fresh container each; 0 means one batch, or
    :data:`DEFAULT_BATCH_SIZE` when ``flags.batched_execution`` is set.
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
    batch_size: int = 0
    username: str = ""
    keys: TaskKeys | None = field(default=None, repr=False)

    @property
    def effective_batch_size(self) -> int:
        """Files per batch; 0 means the whole selection in one batch."""
        if self.batch_size:
            return self.batch_size
        return DEFAULT_BATCH_SIZE if self.flags.batched_execution else 0

    @property
    def batched(self) -> bool:
        """Whether the task runs in batches: the sandbox, the modeller and the log tail hear so."""
        return self.effective_batch_size > 0

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
        if not isinstance(self.task_hash, str) or not _HASH_RE.fullmatch(self.task_hash or "x"):
            raise ConfigurationError(
                f"task_hash: expected 1-128 letters, digits, '.', '_', ':' or '-', got {self.task_hash!r}"
            )
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or not 0 <= self.batch_size <= MAX_BATCH_SIZE
        ):
            raise ConfigurationError(
                f"batch_size: expected a whole number from 0 to {MAX_BATCH_SIZE}, got {self.batch_size!r}"
            )
        try:
            json.dumps(self.parameters, allow_nan=False)
            json.dumps(self.schema, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigurationError(f"parameters and schema must be JSON-serialisable: {exc}") from None
