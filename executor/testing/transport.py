"""An in-process transport whose modeller side is this process: for the demo and the tests.

Pods opened on the same :class:`InMemoryTransport` reach each other. What it
holds for a reader that does not read is capped per task.
"""

from __future__ import annotations

import queue
import shutil
import threading
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from executor import paths
from executor.mailbox.transport import SPOOL_OWNER, Envelope, Route, TransportError, body_size, discard
from executor.task.reaper import new_instance_id

CLOSE_POLL_S = 0.25
# Message types that travel between pods rather than to the modeller.
PEER_TYPES = frozenset({"SECURE_SHARE"})
# What an InMemoryTransport holds, per task and direction, for a reader that
# has not read it yet: enough for the demo and the tests, far below the RAM of
# the machine (a body of up to 4 MiB travels in memory, larger ones in files).
MAX_QUEUED_MESSAGES = 1000
MAX_QUEUED_MEMORY_BYTES = 64 * 1024 * 1024
MAX_QUEUED_BYTES = 1024 * 1024 * 1024


def owned_spool(prefix: str) -> Path:
    """A fresh spool directory under the default spool base, labelled for the reaper.

    It names this process as its owner, so ``sandbox-executor reap`` removes
    it once the process is gone, whatever way it ended.
    """
    base = paths.spool_dir()
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = base / f"{prefix}{uuid.uuid4().hex}"
    path.mkdir(mode=0o700)
    (path / SPOOL_OWNER).write_text(new_instance_id())
    return path


@dataclass
class _Held:
    """Envelopes waiting at one address, by message type, with what they weigh."""

    queues: dict[str, queue.Queue[Envelope]] = field(default_factory=lambda: defaultdict(queue.Queue))
    messages: int = 0
    memory_bytes: int = 0
    total_bytes: int = 0


# An address: ("pod", task_id, pod) for what the modeller sends a task,
# ("modeller", task_id, pod) for what a task sends its modeller, and
# ("share", task_id, pod) for the secure shares of one task's pod.
_Address = tuple[str, str, str]
_ANY_TYPE = ""


class InMemoryTransport:
    """A transport whose modeller is this process: for demos, tests and benchmarks.

    Messages are addressed by task and pod, so a later task of a pod never
    sees what was sent to an earlier one. Large bodies are moved into a spool
    directory, as a real transport would take them over; by default a fresh
    one under the executor's spool base, labelled so that ``reap`` removes it
    if this process dies without :meth:`close`.

    What waits for a reader is capped per task and direction
    (``max_queued_messages``, ``max_queued_memory_bytes`` for bodies held in
    memory, ``max_queued_bytes`` for all): past a cap a send fails with a
    :class:`TransportError`, so a modeller that never reads cannot make this
    process hoard.
    """

    def __init__(
        self,
        spool_dir: Path | None = None,
        *,
        max_queued_messages: int = MAX_QUEUED_MESSAGES,
        max_queued_memory_bytes: int = MAX_QUEUED_MEMORY_BYTES,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
    ) -> None:
        self._lock = threading.Lock()
        self._owns_spool = spool_dir is None
        self._spool_dir = spool_dir
        self._held: dict[_Address, _Held] = {}
        self.max_queued_messages = max_queued_messages
        self.max_queued_memory_bytes = max_queued_memory_bytes
        self.max_queued_bytes = max_queued_bytes
        self._closed = False

    @property
    def _spool(self) -> Path:
        """The spool directory, made on first use (most tasks never need it)."""
        with self._lock:
            if self._spool_dir is None:
                self._spool_dir = owned_spool("transport-")
            return self._spool_dir

    def _put(self, address: _Address, envelope: Envelope) -> None:
        """Queue ``envelope`` at ``address``, taking over its file body.

        Raises:
            TransportError: The address holds as much as it may.
        """
        size = body_size(envelope.body)
        in_memory = size if isinstance(envelope.body, bytes) else 0
        with self._lock:
            if self._closed:
                raise TransportError("the transport is closed")
            held = self._held.setdefault(address, _Held())
            if (
                held.messages + 1 > self.max_queued_messages
                or held.memory_bytes + in_memory > self.max_queued_memory_bytes
                or held.total_bytes + size > self.max_queued_bytes
            ):
                raise TransportError(
                    f"{_describe(address)} already holds {held.messages} unread message(s) of "
                    f"{held.total_bytes} bytes; the in-memory transport keeps at most "
                    f"{self.max_queued_messages} messages, {self.max_queued_memory_bytes} bytes in "
                    f"memory and {self.max_queued_bytes} bytes in all for a reader that does not read"
                )
            held.messages += 1
            held.memory_bytes += in_memory
            held.total_bytes += size
        if isinstance(envelope.body, Path):
            moved = self._spool / uuid.uuid4().hex
            try:
                shutil.move(envelope.body, moved)
            except BaseException:
                self._forget(address, size, in_memory)
                raise
            envelope = Envelope(envelope.type, moved, envelope.peer)
        with self._lock:
            current = self._held.get(address)
            if current is held:
                queue_type = _ANY_TYPE if address[0] == "modeller" else envelope.type
                held.queues[queue_type].put(envelope)
                return
        # Dropped while the body moved (the reader closed, or the transport did).
        discard(envelope)

    def _forget(self, address: _Address, size: int, in_memory: int) -> None:
        with self._lock:
            held = self._held.get(address)
            if held is not None:
                held.messages -= 1
                held.memory_bytes -= in_memory
                held.total_bytes -= size

    def _get(self, address: _Address, message_type: str, timeout: float) -> Envelope | None:
        with self._lock:
            held = self._held.setdefault(address, _Held())
            inbox = held.queues[message_type]
        try:
            envelope = inbox.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None
        size = body_size(envelope.body)
        self._forget(address, size, size if isinstance(envelope.body, bytes) else 0)
        return envelope

    def _drop(self, address: _Address) -> None:
        """Discard everything waiting at ``address``; nobody can read it any more."""
        with self._lock:
            held = self._held.pop(address, None)
        if held is None:
            return
        for inbox in held.queues.values():
            while True:
                try:
                    discard(inbox.get_nowait())
                except queue.Empty:
                    break

    def held(self, task_id: str, pod: str = "") -> tuple[int, int]:
        """Messages and bytes waiting for the modeller from one task's pod."""
        with self._lock:
            held = self._held.get(("modeller", task_id, pod))
            return (held.messages, held.total_bytes) if held is not None else (0, 0)

    def open(self, route: Route) -> InMemoryChannel:
        """The task's channel."""
        return InMemoryChannel(self, route)

    # -- the modeller's side -------------------------------------------
    def to_pod(self, task_id: str, envelope: Envelope, pod: str = "") -> None:
        """Deliver a sealed envelope from the modeller to a task on ``pod``.

        Raises:
            TransportError: The task already holds as much unread mail as it may.
        """
        self._put(("pod", task_id, pod), envelope)

    def from_pod(self, task_id: str, timeout: float, pod: str = "") -> Envelope | None:
        """The next sealed envelope a task on ``pod`` sent to its modeller, or ``None``."""
        return self._get(("modeller", task_id, pod), _ANY_TYPE, timeout)

    def close(self) -> None:
        """Drop undelivered messages and the spool; later sends fail."""
        with self._lock:
            self._closed = True
            addresses = list(self._held)
        for address in addresses:
            self._drop(address)
        if self._owns_spool and self._spool_dir is not None:
            shutil.rmtree(self._spool_dir, ignore_errors=True)


class InMemoryChannel:
    """One task's channel on an :class:`InMemoryTransport`."""

    def __init__(self, transport: InMemoryTransport, route: Route) -> None:
        self._transport = transport
        self.route = route
        self._closed = threading.Event()

    def send(self, envelope: Envelope) -> None:
        """To the modeller, or to the same task on the peer pod the envelope names.

        Raises:
            TransportError: The recipient holds as much unread mail as it may.
        """
        task, pod = self.route.task_id, self.route.pod_identifier
        if not envelope.peer:
            self._transport._put(("modeller", task, pod), envelope)
            return
        if not pod:
            discard(envelope)
            raise TransportError("a task without a pod identifier cannot reach peers")
        # Addressed by task as well as pod, so a share waits for this task on
        # the peer (it may arrive before that task opens) and no other.
        self._transport._put(("share", task, envelope.peer), Envelope(envelope.type, envelope.body, pod))

    def receive(self, message_type: str, timeout: float) -> Envelope | None:
        """Wait up to ``timeout`` seconds for the next ``message_type`` envelope."""
        kind = "share" if message_type in PEER_TYPES else "pod"
        address = (kind, self.route.task_id, self.route.pod_identifier)
        deadline = time.monotonic() + max(0.0, timeout)
        # Wait in slices, so that closing the channel frees a waiting receiver.
        while not self._closed.is_set():
            envelope = self._transport._get(
                address, message_type, min(CLOSE_POLL_S, deadline - time.monotonic())
            )
            if envelope is not None:
                if self._closed.is_set():
                    discard(envelope)
                    return None
                return envelope
            if time.monotonic() >= deadline:
                return None
        return None

    def close(self) -> None:
        """Release waiting receivers and drop what still waits for this task.

        What the task sent its modeller stays until the modeller reads it.
        """
        self._closed.set()
        task, pod = self.route.task_id, self.route.pod_identifier
        self._transport._drop(("pod", task, pod))
        self._transport._drop(("share", task, pod))


def _describe(address: _Address) -> str:
    kind, task, pod = address
    where = f"task {task}" + (f" on pod {pod}" if pod else "")
    if kind == "modeller":
        return f"the modeller's inbox from {where}"
    if kind == "share":
        return f"the secure-share inbox of {where}"
    return f"the inbox of {where}"
