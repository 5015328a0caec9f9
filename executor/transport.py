"""The pod's message service, as the executor sees it.

A pod orchestrator implements :class:`Transport` over its real connection to
the modeller and the other pods; the sandbox never sees it. Everything that
crosses a transport is sealed (see :mod:`executor.crypto`): a transport moves
ciphertext and never needs a key.

:class:`InMemoryTransport` serves the demo and the tests: its modeller side is
this process, and pods opened on the same instance reach each other.
"""

from __future__ import annotations

import queue
import shutil
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from executor.errors import SandboxExecutorError

CLOSE_POLL_S = 0.25
# Message types that travel between pods rather than to the modeller.
PEER_TYPES = frozenset({"SECURE_SHARE"})


class TransportError(SandboxExecutorError):
    """The message service could not deliver or fetch a message."""


@dataclass(frozen=True)
class Route:
    """Who a task talks to.

    Attributes:
        task_id: The task on this pod.
        pod_identifier: This pod.
        modeller_name: The modeller on the other end.
        peers: The other pods of a multi-pod task, for secure shares.
    """

    task_id: str
    pod_identifier: str = ""
    modeller_name: str = ""
    peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Envelope:
    """A sealed message on the wire.

    Attributes:
        type: The ``executor.v1.MessageType`` name.
        body: The sealed body: bytes, or a file for large bodies. Whoever
            receives an envelope with a file owns that file and deletes it.
        peer: For pod-to-pod messages, the recipient (sending) or the sender
            (receiving); empty for the modeller.
    """

    type: str
    body: bytes | Path = field(repr=False)
    peer: str = ""


class Channel(Protocol):
    """One task's connection to its modeller and peers."""

    def send(self, envelope: Envelope) -> None:
        """Deliver ``envelope``; a file body is the transport's once this returns."""
        ...

    def receive(self, message_type: str, timeout: float) -> Envelope | None:
        """The next envelope of ``message_type`` for this task, or ``None`` on timeout."""
        ...

    def close(self) -> None:
        """The task is over: release what the channel holds and end any waiting receive."""
        ...


class Transport(Protocol):
    """What the executor needs from the pod's message service."""

    def open(self, route: Route) -> Channel:
        """A channel for one task."""
        ...


class InMemoryTransport:
    """A transport whose modeller is this process: for demos, tests and benchmarks.

    Large bodies are moved into a spool directory of its own, as a real
    transport would take them over.
    """

    def __init__(self, spool_dir: Path | None = None) -> None:
        self._lock = threading.Lock()
        self._owns_spool = spool_dir is None
        self._spool_dir = spool_dir
        self._to_pod: dict[tuple[str, str], queue.Queue[Envelope]] = defaultdict(queue.Queue)
        self._to_modeller: dict[str, queue.Queue[Envelope]] = defaultdict(queue.Queue)

    def _inbox(self, task_id: str, message_type: str) -> queue.Queue[Envelope]:
        with self._lock:
            return self._to_pod[(task_id, message_type)]

    def _outbox(self, task_id: str) -> queue.Queue[Envelope]:
        with self._lock:
            return self._to_modeller[task_id]

    @property
    def _spool(self) -> Path:
        """The spool directory, made on first use (most tasks never need it)."""
        with self._lock:
            if self._spool_dir is None:
                self._spool_dir = Path(tempfile.mkdtemp(prefix="se-transport-"))
            return self._spool_dir

    def _take(self, envelope: Envelope) -> Envelope:
        if isinstance(envelope.body, Path):
            moved = self._spool / uuid.uuid4().hex
            shutil.move(envelope.body, moved)
            return Envelope(envelope.type, moved, envelope.peer)
        return envelope

    def open(self, route: Route) -> InMemoryChannel:
        """The task's channel."""
        return InMemoryChannel(self, route)

    def _route_to_peer(self, sender: Route, envelope: Envelope) -> None:
        # Held by pod, not task, so a share may arrive before the peer's task opens.
        if not sender.pod_identifier:
            raise TransportError("a task without a pod identifier cannot reach peers")
        self._inbox(_pod_key(envelope.peer), envelope.type).put(
            self._take(Envelope(envelope.type, envelope.body, sender.pod_identifier))
        )

    # -- the modeller's side -------------------------------------------
    def to_pod(self, task_id: str, envelope: Envelope) -> None:
        """Deliver a sealed envelope from the modeller to a task."""
        self._inbox(task_id, envelope.type).put(self._take(envelope))

    def from_pod(self, task_id: str, timeout: float) -> Envelope | None:
        """The next sealed envelope a task sent to its modeller, or ``None``."""
        try:
            return self._outbox(task_id).get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def close(self) -> None:
        """Drop undelivered messages and the spool."""
        if self._owns_spool and self._spool_dir is not None:
            shutil.rmtree(self._spool_dir, ignore_errors=True)


class InMemoryChannel:
    """One task's channel on an :class:`InMemoryTransport`."""

    def __init__(self, transport: InMemoryTransport, route: Route) -> None:
        self._transport = transport
        self.route = route
        self._closed = threading.Event()

    def send(self, envelope: Envelope) -> None:
        """To the modeller, or to the peer pod the envelope names."""
        if envelope.peer:
            self._transport._route_to_peer(self.route, envelope)
        else:
            self._transport._outbox(self.route.task_id).put(self._transport._take(envelope))

    def receive(self, message_type: str, timeout: float) -> Envelope | None:
        """Wait up to ``timeout`` seconds for the next ``message_type`` envelope."""
        key = _pod_key(self.route.pod_identifier) if message_type in PEER_TYPES else self.route.task_id
        inbox = self._transport._inbox(key, message_type)
        deadline = time.monotonic() + max(0.0, timeout)
        # Wait in slices, so that closing the channel frees a waiting receiver.
        while not self._closed.is_set():
            try:
                return inbox.get(timeout=max(0.0, min(CLOSE_POLL_S, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    return None
        return None

    def close(self) -> None:
        """Release waiting receivers; undelivered messages stay with the transport."""
        self._closed.set()


def _pod_key(pod_identifier: str) -> str:
    return f"pod:{pod_identifier}"
