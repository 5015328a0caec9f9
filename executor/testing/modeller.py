"""A modeller in this process, over an :class:`InMemoryTransport`: for the demo and tests.

It holds each task's AES key, as a real modeller does, and seals and opens
bodies in the same format as the pod's parent. It addresses a task by its id
and, for a multi-pod task (whose pods share the id), by the pod.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from executor.mailbox.crypto import (
    STREAM_CHUNK,
    TaskKeys,
    associated_data,
    open_sealed,
    open_stream,
    seal,
    seal_stream,
)
from executor.mailbox.transport import Envelope
from executor.testing.transport import InMemoryTransport, owned_spool

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass(frozen=True)
class ModellerMessage:
    """A message the modeller received, opened.

    Attributes:
        type: The message type name.
        body: The plaintext, for bodies that travelled in memory.
        path: The plaintext in a file, for large bodies.
    """

    type: str
    body: bytes | None = None
    path: Path | None = None

    def read(self) -> bytes:
        """The plaintext, wherever it is."""
        if self.body is not None:
            return self.body
        assert self.path is not None
        return self.path.read_bytes()


class LocalModeller:
    """The modeller's end of an in-memory transport.

    Args:
        transport: The transport the pods' executors use.
        spool_dir: Where large bodies are staged; by default a fresh directory
            under the executor's spool base, which ``reap`` removes if this
            process dies without :meth:`close`.
    """

    def __init__(self, transport: InMemoryTransport, spool_dir: Path | None = None) -> None:
        self.transport = transport
        self._keys: dict[tuple[str, str], TaskKeys] = {}
        self._owns_spool = spool_dir is None
        self._spool = spool_dir or owned_spool("modeller-")
        self._n = 0

    def add_task(self, task_id: str, keys: TaskKeys, pod: str = "") -> None:
        """Share the key of ``task_id`` on ``pod`` with this modeller."""
        self._keys[(task_id, pod)] = keys

    def _spool_file(self) -> Path:
        self._n += 1
        return self._spool / f"m{self._n}"

    def send(self, task_id: str, message_type: str, body: bytes, pod: str = "") -> None:
        """Seal ``body`` and deliver it to the task."""
        key = self._keys[(task_id, pod)].aes_key
        sealed = seal(key, body, associated_data(task_id, message_type))
        self.transport.to_pod(task_id, Envelope(message_type, sealed), pod)

    def send_stream(self, task_id: str, message_type: str, chunks: Iterator[bytes], pod: str = "") -> None:
        """Seal a large body chunk by chunk into a file and deliver it."""
        key = self._keys[(task_id, pod)].aes_key
        path = self._spool_file()
        try:
            with path.open("wb") as out:
                seal_stream(key, chunks, out, associated_data(task_id, message_type))
            self.transport.to_pod(task_id, Envelope(message_type, path), pod)
        finally:
            path.unlink(missing_ok=True)

    def ready(self, task_id: str, pod: str = "") -> None:
        """Tell the task the modeller is ready (the modeller's TASK_START)."""
        self.send(task_id, "TASK_START", b"", pod)

    def receive(self, task_id: str, timeout: float, pod: str = "") -> ModellerMessage | None:
        """The next message the task sent, opened; ``None`` on timeout."""
        envelope = self.transport.from_pod(task_id, timeout, pod)
        if envelope is None:
            return None
        key = self._keys[(task_id, pod)].aes_key
        aad = associated_data(task_id, envelope.type)
        if isinstance(envelope.body, Path):
            out_path = self._spool_file()
            try:
                with out_path.open("wb") as out:
                    open_stream(key, envelope.body, out, aad)
            except BaseException:
                out_path.unlink(missing_ok=True)
                raise
            finally:
                envelope.body.unlink(missing_ok=True)
            return ModellerMessage(envelope.type, path=out_path)
        return ModellerMessage(envelope.type, body=open_sealed(key, envelope.body, aad))

    def close(self) -> None:
        """Remove staged files."""
        if self._owns_spool:
            shutil.rmtree(self._spool, ignore_errors=True)


def chunked(data: bytes | memoryview, size: int = STREAM_CHUNK) -> Iterator[bytes]:
    """``data`` in pieces of at most ``size`` bytes."""
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])
