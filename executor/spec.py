"""What a task is, as the pod orchestrator describes it: :class:`TaskSpec`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from executor.errors import ConfigurationError
from executor.mailbox.crypto import TaskKeys

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
    batched_execution: bool = False
    test_run: bool = False
    run_on_new_data_only: bool = False
    force_rerun_failed_files: bool = False
    max_inference_files: int = 0
    max_inference_batches: int = 0
    model_urls: dict[str, str] = field(default_factory=dict)
    task_hash: str = ""
    username: str = ""
    keys: TaskKeys | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
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
