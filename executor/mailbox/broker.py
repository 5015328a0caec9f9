"""The parent's half of a task's proxy mailbox: limits, crypto and spooling.

The sandbox hands over and receives plaintext; this broker seals and opens it
with the task's keys, which never leave the parent, and moves ciphertext over
the pod's :class:`~executor.mailbox.transport.Channel`. Bodies above
:data:`SPOOL_THRESHOLD` stream through a file, one chunk in memory at a time,
so a 256 MiB training update costs the parent megabytes, not a second copy.

Secure shares are metered like any other body: each counts its sealed size
against the task's byte quota, and a task may send and receive at most
:data:`MAX_TASK_SHARES` of them each way, which also bounds the RSA work it
can make the parent do. Each share is bound to its task and pods (see
:func:`~executor.mailbox.crypto.share_label`); one that does not open is dropped.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from executor.errors import MailboxLimitError as MailboxLimitError
from executor.errors import SandboxExecutorError
from executor.mailbox.crypto import (
    OVERHEAD_BYTES,
    DecryptionError,
    TaskKeys,
    associated_data,
    is_segmented,
    open_sealed,
    open_segments,
    open_share,
    open_stream,
    plaintext_size,
    seal,
    seal_share,
    seal_stream,
    share_label,
)
from executor.mailbox.transport import SPOOL_OWNER, Channel, Envelope, Route, TransportError, discard

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

log = logging.getLogger(__name__)

SPOOL_THRESHOLD = 4 * 1024 * 1024
# Secure shares one task may send, and receive, in all. A share costs the
# parent an RSA operation (a private-key one to open), so this bounds the
# parent's work for one task as well as the task's traffic.
MAX_TASK_SHARES = 4096
READY_POLL_S = 0.5


@dataclass
class Incoming:
    """A received body to stream onward: plaintext in memory or in a spool file, or sealed.

    A body sealed in segments (``sealed``) is opened as it streams, one
    authenticated segment at a time: its first byte need not wait for its
    last, and no plaintext copy of it is written. A segment that fails
    authentication raises :class:`DecryptionError` from :meth:`chunks`, after
    the segments before it, so a consumer must treat the body as lost then.
    """

    type: str
    size: int
    body: bytes | None = None
    path: Path | None = None
    sealed: Path | None = None
    key: bytes = field(default=b"", repr=False)
    aad: bytes = b""

    def chunks(self, chunk_size: int) -> Iterator[bytes]:
        """The body in pieces of at most ``chunk_size`` bytes.

        Raises:
            DecryptionError: A sealed body failed authentication part-way.
        """
        if self.body is not None:
            yield from _pieces(self.body, chunk_size)
            return
        if self.sealed is not None:
            with self.sealed.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                for segment in open_segments(self.key, f, size, self.aad):
                    yield from _pieces(segment, chunk_size)
            return
        assert self.path is not None
        with self.path.open("rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def discard(self) -> None:
        """Delete the spool file, if any."""
        for path in (self.path, self.sealed):
            if path is not None:
                path.unlink(missing_ok=True)


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    if len(data) <= size:
        if data:
            yield data
        return
    view = memoryview(data)
    for start in range(0, len(view), size):
        yield bytes(view[start : start + size])


class MailboxBroker:
    """Seals, opens and meters one task's mailbox traffic.

    Args:
        route: Who the task talks to.
        channel: The task's channel on the pod's transport.
        keys: The task's keys.
        spool_dir: A private directory for large bodies; removed by :meth:`close`.
        owner: The executor instance, written into the spool for the reaper.
        max_message_bytes: Largest plaintext body either way.
        max_task_bytes: Most plaintext bytes the task may move, both ways together.
    """

    def __init__(
        self,
        route: Route,
        channel: Channel,
        keys: TaskKeys,
        spool_dir: Path,
        *,
        max_message_bytes: int,
        max_task_bytes: int,
        owner: str = "",
    ) -> None:
        self.route = route
        self._channel = channel
        self._keys = keys
        self._spool = spool_dir
        self._spool.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self._spool / SPOOL_OWNER).write_text(owner)
        self.max_message_bytes = max_message_bytes
        self.max_task_bytes = max_task_bytes
        self._lock = threading.Lock()
        self._moved = 0
        self._shares_sent = 0
        self._shares_received = 0
        self._closed = threading.Event()
        # Set once a TASK_ABORT, the protocol's or the parent's, reached the transport.
        self._abort_sent = threading.Event()

    def _spool_path(self) -> Path:
        return self._spool / uuid.uuid4().hex

    def _reserve(self, size: int, direction: str) -> None:
        if size > self.max_message_bytes:
            raise MailboxLimitError(
                f"{direction} message is {size} bytes; the limit is {self.max_message_bytes}"
            )
        with self._lock:
            if self._moved + size > self.max_task_bytes:
                raise MailboxLimitError(
                    f"the task has moved {self._moved} bytes; {size} more would pass its limit of "
                    f"{self.max_task_bytes}"
                )
            self._moved += size

    def _refund(self, size: int) -> None:
        """Give back a reservation for bytes that did not move."""
        with self._lock:
            self._moved -= size

    # -- to the modeller -----------------------------------------------
    def send(
        self, message_type: str, declared_size: int, chunks: Iterator[bytes], *, metered: bool = True
    ) -> None:
        """Seal the body and hand it to the transport.

        The declared size is reserved from the task's quota first and given
        back if the body does not reach the transport (it was refused, short,
        long, or the transport failed), so a refused send costs no quota.

        Args:
            message_type: The message type.
            declared_size: The body's size, as the sender declared it.
            chunks: The body.
            metered: Count it against the task's quota (not for the parent's own notices).

        Raises:
            MailboxLimitError: The body is too large, or not ``declared_size``.
        """
        if metered:
            self._reserve(declared_size, "outgoing")
        try:
            self._send(message_type, declared_size, chunks)
        except BaseException:
            if metered:
                self._refund(declared_size)
            raise
        if message_type == "TASK_ABORT":
            self._abort_sent.set()

    def _send(self, message_type: str, declared_size: int, chunks: Iterator[bytes]) -> None:
        checked = _exactly(chunks, declared_size)
        aad = associated_data(self.route.task_id, message_type)
        key = self._keys.aes_key
        if declared_size <= SPOOL_THRESHOLD:
            body = b"".join(checked)
            self._channel.send(Envelope(message_type, seal(key, body, aad)))
            return
        path = self._spool_path()
        try:
            with path.open("wb") as out:
                seal_stream(key, checked, out, aad)
            self._channel.send(Envelope(message_type, path))
        finally:
            path.unlink(missing_ok=True)

    def send_bytes(self, message_type: str, body: bytes) -> None:
        """Seal and send a body the parent itself composed (e.g. a TASK_ABORT).

        Not counted against the task's quota: what the sandbox used must not
        silence the parent.
        """
        self.send(message_type, len(body), iter([body]), metered=False)

    @property
    def abort_sent(self) -> bool:
        """Whether the modeller has been sent a TASK_ABORT for this task (by anyone)."""
        return self._abort_sent.is_set()

    def send_abort(self, body: bytes) -> bool:
        """Send the parent's TASK_ABORT, unless the modeller has already been sent one.

        A protocol that said why it aborts (``ctx.mailbox.send_task_abort``) has
        told the modeller more than the parent can; a second notice would only
        contradict it.

        Returns:
            Whether this notice was sent.
        """
        if self.abort_sent:
            return False
        self.send_bytes("TASK_ABORT", body)
        return True

    # -- from the modeller ---------------------------------------------
    def receive(self, message_type: str, timeout: float) -> Incoming | None:
        """The next ``message_type`` body for the task, opened; ``None`` on timeout.

        Raises:
            MailboxLimitError: The body is larger than the limits allow.
            DecryptionError: The body fails authentication.
        """
        envelope = self._channel.receive(message_type, timeout)
        if envelope is None:
            return None
        aad = associated_data(self.route.task_id, message_type)
        key = self._keys.aes_key
        if isinstance(envelope.body, bytes):
            self._reserve(max(0, len(envelope.body) - OVERHEAD_BYTES), "incoming")
            body = open_sealed(key, envelope.body, aad)
            return Incoming(message_type, len(body), body=body)
        sealed_path = envelope.body
        handed_on = False
        try:
            if is_segmented(sealed_path):
                # Opened as it streams to the sandbox: no plaintext copy on disk.
                size = plaintext_size(sealed_path.stat().st_size)
                self._reserve(size, "incoming")
                handed_on = True
                return Incoming(message_type, size, sealed=sealed_path, key=key, aad=aad)
            self._reserve(max(0, sealed_path.stat().st_size - OVERHEAD_BYTES), "incoming")
            plain = self._spool_path()
            try:
                with plain.open("wb") as out:
                    size = open_stream(key, sealed_path, out, aad)
            except BaseException:
                plain.unlink(missing_ok=True)
                raise
            return Incoming(message_type, size, path=plain)
        finally:
            if not handed_on:
                sealed_path.unlink(missing_ok=True)

    # -- secure aggregation --------------------------------------------
    def send_shares(self, shares: dict[str, bytes]) -> None:
        """Seal each share for its recipient pod, bound to this task, and send it.

        Raises:
            MailboxLimitError: A recipient is not a peer of this task, or the
                shares would pass the task's share cap or byte quota.
        """
        unknown = sorted(set(shares) - set(self.route.peers))
        if unknown:
            raise MailboxLimitError(f"not peers of this task: {', '.join(unknown)}")
        missing = [p for p in shares if p not in self._keys.peer_public_keys]
        if missing:
            raise MailboxLimitError(f"no public key for peer(s): {', '.join(sorted(missing))}")
        with self._lock:
            if self._shares_sent + len(shares) > MAX_TASK_SHARES:
                raise MailboxLimitError(
                    f"the task has sent {self._shares_sent} secure shares; {len(shares)} more would pass "
                    f"its limit of {MAX_TASK_SHARES}"
                )
            self._shares_sent += len(shares)
        # What crosses the transport: one RSA block per share.
        sealed_bytes = sum(self._keys.peer_public_keys[p].key_size // 8 for p in shares)
        try:
            self._reserve(sealed_bytes, "outgoing secure shares")
        except MailboxLimitError:
            with self._lock:
                self._shares_sent -= len(shares)
            raise
        me = self.route.pod_identifier
        for pod, share in shares.items():
            label = share_label(self.route.task_id, me, pod)
            sealed = seal_share(self._keys.peer_public_keys[pod], share, label)
            self._channel.send(Envelope("SECURE_SHARE", sealed, peer=pod))

    def get_shares(self, timeout: float) -> dict[str, bytes] | None:
        """One share from every peer, opened; ``None`` if they did not all come in time.

        A share that is not from an expected peer, is a second from the same
        peer, or does not open for this task and pod is dropped and logged.

        Raises:
            MailboxLimitError: The pod has no private key, or the task has
                received as many shares as it may, or its byte quota is spent.
        """
        private_key = self._keys.pod_private_key
        if private_key is None:
            raise MailboxLimitError("this pod has no private key for secure shares")
        expected = set(self.route.peers)
        got: dict[str, bytes] = {}
        deadline = time.monotonic() + timeout
        while set(got) != expected:
            remaining = deadline - time.monotonic()
            envelope = self._channel.receive("SECURE_SHARE", max(0.0, remaining)) if remaining > 0 else None
            if envelope is None:
                return None
            with self._lock:
                if self._shares_received >= MAX_TASK_SHARES:
                    discard(envelope)
                    raise MailboxLimitError(
                        f"the task has received {self._shares_received} secure shares, its limit"
                    )
                self._shares_received += 1
            if envelope.peer not in expected or envelope.peer in got or not isinstance(envelope.body, bytes):
                discard(envelope)
                log.warning("task %s: dropped a secure share from %r", self.route.task_id, envelope.peer)
                continue
            self._reserve(len(envelope.body), "incoming secure share")
            label = share_label(self.route.task_id, envelope.peer, self.route.pod_identifier)
            try:
                got[envelope.peer] = open_share(private_key, envelope.body, label)
            except DecryptionError:
                log.warning(
                    "task %s: dropped a secure share from %r that was not sealed for this task and pod",
                    self.route.task_id,
                    envelope.peer,
                )
        return got

    # -- modeller readiness --------------------------------------------
    def watch_ready(self, on_ready: Callable[[], None]) -> None:
        """Call ``on_ready`` once the modeller's TASK_START arrives (in a thread)."""

        def watch() -> None:
            aad = associated_data(self.route.task_id, "TASK_START")
            while not self._closed.is_set():
                try:
                    envelope = self._channel.receive("TASK_START", READY_POLL_S)
                except TransportError as exc:  # e.g. no modeller attached: it will never be ready
                    log.info("task %s: the modeller will not say it is ready: %s", self.route.task_id, exc)
                    return
                except Exception:
                    log.exception("task %s: waiting for the modeller failed", self.route.task_id)
                    return
                if envelope is None:
                    continue
                if not isinstance(envelope.body, bytes):
                    envelope.body.unlink(missing_ok=True)
                    continue
                try:
                    open_sealed(self._keys.aes_key, envelope.body, aad)
                except SandboxExecutorError:
                    log.error("task %s: the modeller's TASK_START failed authentication", self.route.task_id)
                    continue
                on_ready()
                return

        threading.Thread(target=watch, name=f"ready-{self.route.task_id[:8]}", daemon=True).start()

    def close(self) -> None:
        """Stop watching, close the channel (freeing waiting receives), remove the spool."""
        self._closed.set()
        self._channel.close()
        shutil.rmtree(self._spool, ignore_errors=True)


def _exactly(chunks: Iterator[bytes], size: int) -> Iterator[bytes]:
    """Pass ``chunks`` through, failing as soon as they exceed ``size`` or end short."""
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > size:
            raise MailboxLimitError(f"message body is longer than its declared {size} bytes")
        yield chunk
    if total != size:
        raise MailboxLimitError(f"message body is {total} bytes, not its declared {size}")
