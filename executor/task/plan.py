"""What a task may see, decided by the parent: its selection of files, its batches, its hash."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from executor.data.selection import Selection, effective_max_files, plan_batches, select
from executor.data.store import FileStates
from executor.data.view import check_view_budget
from executor.data.viewpaths import ViewPaths
from executor.sandbox.contract import SANDBOX_DATA
from executor.task.taskdir import data_view_path

if TYPE_CHECKING:
    from pathlib import Path

    from executor.data.scan import FileStamp
    from executor.spec import TaskSpec
    from executor.task.host import TaskHost


def default_task_hash(bundle_sha256: str, parameters: dict[str, Any]) -> str:
    """The task hash when the orchestrator gives none: the bundle's digest and the parameters."""
    digest = hashlib.sha256(b"sandbox-executor task hash v1\0")
    digest.update(bundle_sha256.encode())
    digest.update(b"\0")
    digest.update(json.dumps(parameters, sort_keys=True, separators=(",", ":")).encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class Plan:
    """What the parent decided the task may see: the selection and its batches."""

    selection: Selection
    batches: list[tuple[FileStamp, ...]]
    batch_size: int


def plan_task(host: TaskHost, spec: TaskSpec, task_hash: str, data_dir: Path, files: list[FileStamp]) -> Plan:
    """Which files the task may see, and in which batches: decided here, never by the sandbox."""
    flags = spec.flags
    # What this task hash did before matters only to a run on new data only.
    states = (
        host.db.file_states(spec.project_id, task_hash)
        if host.db is not None and flags.run_on_new_data_only
        else FileStates()
    )
    selection = select(
        files,
        processed=states.processed,
        failed=states.failed_stamps,
        new_data_only=flags.run_on_new_data_only,
        force_rerun_failed=flags.force_rerun_failed_files,
        max_files=effective_max_files(flags.test_run, spec.inference_limits.max_files),
        view_paths=ViewPaths.of(
            host.run_dir, data_dir, host.view_method, SANDBOX_DATA, view_dir=data_view_path(host.run_dir)
        ),
    )
    batch_size = spec.effective_batch_size
    batches, selection = plan_batches(selection, batch_size, spec.inference_limits.max_batches)
    check_view_budget(host.run_dir, data_dir, host.view_method, max(map(len, batches)))
    return Plan(selection, batches, batch_size)
