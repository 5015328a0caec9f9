"""What a protocol's ``run(ctx)`` receives: the task, the data, the mailbox, progress.

The context is assembled here from rooms of their own: the exception tree
(:mod:`~executor.sandbox.errors`), the channel to the parent
(:mod:`~executor.sandbox.client`), the mailbox (:mod:`~executor.sandbox.mailbox`),
progress (:mod:`~executor.sandbox.progress`) and result rows and file
outcomes (:mod:`~executor.sandbox.results`). Their public names stay
importable from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from executor.sandbox.client import RATE_BACKOFF_S as RATE_BACKOFF_S
from executor.sandbox.client import RATE_RETRIES as RATE_RETRIES
from executor.sandbox.client import RPC_TIMEOUT_S as RPC_TIMEOUT_S

# A re-export the runtime and protocols import at run time, not an annotation-only import.
from executor.sandbox.client import ParentClient as ParentClient  # noqa: TC001
from executor.sandbox.errors import MailboxError as MailboxError
from executor.sandbox.errors import MailboxTimeout as MailboxTimeout
from executor.sandbox.errors import ReportRefused as ReportRefused
from executor.sandbox.errors import SandboxError as SandboxError
from executor.sandbox.errors import TaskAborted as TaskAborted
from executor.sandbox.mailbox import Mailbox as Mailbox
from executor.sandbox.progress import Progress as Progress
from executor.sandbox.results import Reports

if TYPE_CHECKING:
    import threading

    from executor.v1 import sandbox_pb2 as pb


@dataclass(frozen=True)
class Flags:
    """The task's execution flags."""

    batched_execution: bool
    test_run: bool
    run_on_new_data_only: bool
    force_rerun_failed_files: bool


class Context(Reports):
    """Everything a protocol gets. Passed as the single argument of ``run(ctx)``.

    Attributes:
        task_id, project_id, modeller_name, pod_identifier, pod_identifiers,
        datasource_name, task_hash, username: The task's identity.
        parameters: The protocol's parameters (a dict from JSON).
        schema: The datasource schema (a dict from JSON).
        serialized_protocol: The modeller's serialised protocol, as sent.
        flags: Execution flags.
        model_urls: Model names to download URLs (not reachable from here).
        secrets: The secrets the project's policy grants, by name (usually none).
        data_dir: The datasource, read-only.
        scratch_dir: A small writable directory (memory-backed, not executable).
        mailbox: The proxy mailbox.
        progress: Progress reporting.

    Besides these: :meth:`save_results` hands result rows to the parent (which
    stores them, e.g. in the pod's project database), :meth:`file_processed`
    and :meth:`file_failed` report per-file outcomes, :meth:`report` sends a
    report of any other kind the contract has, and :meth:`abort` ends the
    task with status ABORT. What the protocol logs with :mod:`logging`
    (INFO and above, unless it configures logging itself) or prints reaches
    the parent's log of the task.
    """

    def __init__(
        self,
        config: pb.TaskConfig,
        client: ParentClient,
        scratch_dir: Path,
        *,
        modeller_ready: threading.Event | None = None,
    ) -> None:
        self.task_id = config.task_id
        self.project_id = config.project_id
        self.modeller_name = config.modeller_name
        self.pod_identifier = config.pod_identifier
        self.pod_identifiers = list(config.pod_identifiers)
        self.datasource_name = config.datasource_name
        self.task_hash = config.task_hash
        self.username = config.username
        self.parameters: dict[str, Any] = json.loads(config.parameters_json or "{}")
        self.schema: dict[str, Any] = json.loads(config.schema_json or "{}")
        self.serialized_protocol = bytes(config.serialized_protocol)
        self.flags = Flags(
            config.flags.batched_execution,
            config.flags.test_run,
            config.flags.run_on_new_data_only,
            config.flags.force_rerun_failed_files,
        )
        self.max_inference_files = config.inference_limits.max_files
        self.max_inference_batches = config.inference_limits.max_batches
        self.model_urls = dict(config.model_urls)
        self.secrets = dict(config.secrets)
        self.data_dir = Path(config.data_path)
        self.scratch_dir = scratch_dir
        self._client = client
        self.mailbox = Mailbox(client, config.chunk_bytes, config.max_message_bytes, modeller_ready)
        self.progress = Progress(client)

    def abort(self, message: str, reason: str = "") -> NoReturn:
        """End the task now with status ABORT and a message for the modeller."""
        raise TaskAborted(message, reason)
