"""What a protocol's ``run(ctx)`` receives: the task, the data, the mailbox, progress."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import grpc

from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc

RPC_TIMEOUT_S = 30.0


class TaskAborted(Exception):
    """Raised by :meth:`Context.abort`: the task ends with status ABORT."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class MailboxError(Exception):
    """The parent refused or failed a mailbox operation."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class MailboxTimeout(MailboxError, TimeoutError):
    """No message of the requested type arrived in time."""


class ParentClient:
    """The authenticated stub and the counters the heartbeat reports."""

    def __init__(self, stub: pb_grpc.SandboxStub, metadata: tuple[tuple[str, str], ...]) -> None:
        self.stub = stub
        self.metadata = metadata
        self._lock = threading.Lock()
        self.progress_events = 0
        self.mailbox_ops = 0

    def count(self, *, progress: int = 0, mailbox: int = 0) -> None:
        """Add to the counters the next beat carries."""
        with self._lock:
            self.progress_events += progress
            self.mailbox_ops += mailbox


def _type_value(message_type: str) -> str:
    if message_type not in pb.MessageType.keys():  # noqa: SIM118 (an enum wrapper, not a dict)
        raise ValueError(f"unknown message type {message_type!r}")
    return message_type


class Mailbox:
    """The proxy mailbox: the parent owns the real connection and every key."""

    def __init__(self, client: ParentClient) -> None:
        self._client = client
        self.modeller_ready = threading.Event()

    def send(self, message_type: str, body: bytes) -> None:
        """Send ``body`` (plaintext; the parent encrypts it) to the modeller."""
        self._client.count(mailbox=1)
        try:
            self._client.stub.SendMessage(
                pb.SendMessageRequest(type=_type_value(message_type), body=bytes(body)),
                metadata=self._client.metadata,
                timeout=RPC_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            raise MailboxError(f"send {message_type} failed: {exc.details()}", exc.code().name) from None

    def receive(self, message_type: str, timeout: float = 60.0) -> bytes:
        """Wait up to ``timeout`` seconds for the modeller's next ``message_type`` message.

        Raises:
            MailboxTimeout: Nothing arrived in time.
            MailboxError: The parent refused the request.
        """
        self._client.count(mailbox=1)
        try:
            reply = self._client.stub.ReceiveMessage(
                pb.ReceiveMessageRequest(type=_type_value(message_type), timeout_ms=int(timeout * 1000)),
                metadata=self._client.metadata,
                timeout=timeout + RPC_TIMEOUT_S,
            )
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise MailboxTimeout(
                    f"no {message_type} message within {timeout:g} s", "DEADLINE_EXCEEDED"
                ) from None
            raise MailboxError(f"receive {message_type} failed: {exc.details()}", exc.code().name) from None
        return bytes(reply.body)


class Progress:
    """Progress events: they feed the operator's progress bars."""

    def __init__(self, client: ParentClient) -> None:
        self._client = client

    def _report(self, kind: str, **fields: Any) -> None:
        self._client.count(progress=1)
        self._client.stub.ReportProgress(
            pb.ProgressEvent(kind=kind, **fields),
            metadata=self._client.metadata,
            timeout=RPC_TIMEOUT_S,
        )

    def run_start(self) -> None:
        """The protocol's main work begins."""
        self._report("RUN_START")

    def run_end(self) -> None:
        """The protocol's main work is done."""
        self._report("RUN_END")

    def epoch_start(self, epoch: int, max_epochs: int) -> None:
        """Epoch ``epoch`` (1-based) of ``max_epochs`` begins."""
        self._report("EPOCH_START", current_epoch=epoch, max_epochs=max_epochs)

    def epoch_end(self, epoch: int, max_epochs: int) -> None:
        """Epoch ``epoch`` of ``max_epochs`` is done."""
        self._report("EPOCH_END", current_epoch=epoch, max_epochs=max_epochs)

    def step(
        self, current: int, total: int = 0, info: str = "", *, epoch: int = 0, max_epochs: int = 0
    ) -> None:
        """``current`` of ``total`` units done, with an optional short note."""
        self._report(
            "STEP", current=current, total=total, info=info[:1024], current_epoch=epoch, max_epochs=max_epochs
        )


@dataclass(frozen=True)
class Flags:
    """The task's execution flags."""

    batched_execution: bool
    test_run: bool
    run_on_new_data_only: bool
    force_rerun_failed_files: bool


class Context:
    """Everything a protocol gets. Passed as the single argument of ``run(ctx)``.

    Attributes:
        task_id, project_id, modeller_name, pod_identifier, pod_identifiers,
        datasource_name, task_hash, username: The task's identity.
        parameters: The protocol's parameters (a dict from JSON).
        schema: The datasource schema (a dict from JSON).
        serialized_protocol: The modeller's serialised protocol, as sent.
        flags: Execution flags.
        model_urls: Model names to download URLs (not reachable from here).
        data_dir: The datasource, read-only.
        scratch_dir: A small writable directory (memory-backed, not executable).
        mailbox: The proxy mailbox.
        progress: Progress reporting.
    """

    def __init__(self, config: pb.TaskConfig, client: ParentClient, scratch_dir: Path) -> None:
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
        self.data_dir = Path(config.data_path)
        self.scratch_dir = scratch_dir
        self.mailbox = Mailbox(client)
        self.progress = Progress(client)

    def abort(self, message: str, reason: str = "") -> NoReturn:
        """End the task now with status ABORT and a message for the modeller."""
        raise TaskAborted(message, reason)
