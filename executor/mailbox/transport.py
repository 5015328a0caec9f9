"""The pod's message service, as the executor sees it.

A pod orchestrator implements :class:`Transport` over its real connection to
the modeller and the other pods; the sandbox never sees it. Everything that
crosses a transport is sealed (see :mod:`executor.mailbox.crypto`): a transport
moves ciphertext and never needs a key.

:class:`NoModellerTransport` is the default when no modeller is attached (the
CLI): what a task sends is discarded and counted, never stored, and a receive
fails at once. For the demo and the tests, :class:`executor.testing.InMemoryTransport`
has its modeller side in the same process.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from executor.errors import TransportError as TransportError

# The file in a spool directory that names the executor instance owning it;
# the reaper removes spools whose owner is dead.
SPOOL_OWNER = ".owner"


@dataclass(frozen=True)
class Route:
    """Who a task talks to.

    Attributes:
        task_id: The task. The pods of one multi-pod task share its id, as the
            modeller issues it; secure shares are bound to it.
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


def body_size(body: bytes | Path) -> int:
    """The size of a sealed body, in memory or in a file (0 if the file is gone)."""
    if isinstance(body, bytes):
        return len(body)
    try:
        return body.stat().st_size
    except OSError:
        return 0


def discard(envelope: Envelope) -> None:
    """Drop an envelope, deleting its file body if it has one."""
    if isinstance(envelope.body, Path):
        envelope.body.unlink(missing_ok=True)


# -- no modeller -----------------------------------------------------------


@dataclass
class Discarded:
    """What a task sent while no modeller was attached."""

    messages: int = 0
    bytes: int = 0


class NoModellerTransport:
    """The transport of a task with nobody on the other end (the CLI's).

    Nothing is stored: a message a task sends is counted and dropped (a file
    body is deleted at once), and a receive fails with a :class:`TransportError`
    that says no modeller is attached.
    """

    NO_MODELLER = "no modeller or peer pod is attached to this task, so no message will arrive"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._discarded: dict[str, Discarded] = defaultdict(Discarded)

    def open(self, route: Route) -> NoModellerChannel:
        """The task's channel."""
        return NoModellerChannel(self, route)

    def discarded(self, task_id: str) -> Discarded:
        """How many messages (and sealed bytes) ``task_id`` sent that were dropped."""
        with self._lock:
            counted = self._discarded.get(task_id, Discarded())
            return Discarded(counted.messages, counted.bytes)

    def _count(self, task_id: str, envelope: Envelope) -> None:
        size = body_size(envelope.body)
        discard(envelope)
        with self._lock:
            counted = self._discarded[task_id]
            counted.messages += 1
            counted.bytes += size

    def close(self) -> None:
        """Nothing is held; here for symmetry with other transports."""


class NoModellerChannel:
    """One task's channel on a :class:`NoModellerTransport`."""

    def __init__(self, transport: NoModellerTransport, route: Route) -> None:
        self._transport = transport
        self.route = route

    def send(self, envelope: Envelope) -> None:
        """Count the envelope and drop it."""
        self._transport._count(self.route.task_id, envelope)

    def receive(self, message_type: str, timeout: float) -> Envelope | None:
        """Fail at once: nothing can arrive.

        Raises:
            TransportError: Always.
        """
        raise TransportError(NoModellerTransport.NO_MODELLER)

    def close(self) -> None:
        """Nothing to release."""
