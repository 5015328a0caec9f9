"""The parent's side of the proxy mailbox: how messages reach the modeller.

A pod orchestrator implements :class:`Transport` over its real message service;
the sandbox never sees that connection. :class:`InMemoryTransport` serves the
demo and the tests, with a local modeller that reads and writes its queues.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Message:
    """One mailbox message.

    Attributes:
        task_id: The task it belongs to.
        type: Its ``executor.v1.MessageType`` name, e.g. ``TRAINING_UPDATE``.
        body: The plaintext body.
    """

    task_id: str
    type: str
    body: bytes


class Transport(Protocol):
    """What the executor needs from the pod's message service."""

    def send(self, message: Message) -> None:
        """Deliver ``message`` from the task to its modeller."""
        ...

    def receive(self, task_id: str, message_type: str, timeout: float) -> bytes | None:
        """The next message of ``message_type`` for ``task_id``, or ``None`` on timeout."""
        ...


class InMemoryTransport:
    """A transport whose modeller side is this process: for demos and tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inboxes: dict[tuple[str, str], queue.Queue[bytes]] = defaultdict(queue.Queue)
        self._outbox: queue.Queue[Message] = queue.Queue()

    def _inbox(self, task_id: str, message_type: str) -> queue.Queue[bytes]:
        with self._lock:
            return self._inboxes[(task_id, message_type)]

    def send(self, message: Message) -> None:
        """Record a message from the task for the modeller to read."""
        self._outbox.put(message)

    def receive(self, task_id: str, message_type: str, timeout: float) -> bytes | None:
        """Wait up to ``timeout`` seconds for the modeller's next message."""
        try:
            return self._inbox(task_id, message_type).get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def deliver(self, task_id: str, message_type: str, body: bytes) -> None:
        """Act as the modeller: queue ``body`` for the task to receive."""
        self._inbox(task_id, message_type).put(body)

    def sent(self, timeout: float = 0.0) -> Message | None:
        """Act as the modeller: the next message a task sent, or ``None``."""
        try:
            return self._outbox.get(timeout=timeout) if timeout > 0 else self._outbox.get_nowait()
        except queue.Empty:
            return None
