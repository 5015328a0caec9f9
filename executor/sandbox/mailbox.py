"""The proxy mailbox a protocol gets as ``ctx.mailbox``: send, receive, batch messages, secure shares."""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
from typing import TYPE_CHECKING, TypeVar

import grpc

from executor.sandbox.body import _Body, _recv_all
from executor.sandbox.client import BULK_TIMEOUT_S, RPC_TIMEOUT_S, ParentClient, _trailer
from executor.sandbox.contract import (
    BULK_BUSY_TRAILER,
    BULK_MIN_BYTES,
    BULK_STATUS_MAX_BYTES,
    MAX_OPEN_RECEIVES,
    MAX_OPEN_SENDS,
    MAX_OPEN_SHARE_RECEIVES,
    MessageType,
    batches_complete_body,
    current_batch_id_body,
    number_of_batches_body,
    task_abort_body,
)
from executor.sandbox.errors import MailboxError, MailboxTimeout, _status
from executor.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

_R = TypeVar("_R")


def _single(replies: Iterator[pb.MailboxReply]) -> pb.MailboxReply:
    """The one reply of an operation that has one."""
    reply = next(replies)
    for _ in replies:  # a well-behaved parent sends none; the stream must stay in step
        pass
    return reply


def _type_value(message_type: str) -> str:
    if message_type not in MessageType.__members__:
        raise ValueError(f"unknown message type {message_type!r}")
    return str(message_type)


class _OpStream:
    """The runtime's long-lived mailbox stream: one operation at a time, its replies before the next."""

    def __init__(self, client: ParentClient) -> None:
        self._requests: queue.Queue[pb.MailboxOp | None] = queue.Queue()
        self._replies = client.stub.Mailbox(iter(self._requests.get, None), metadata=client.metadata)
        self.lock = threading.Lock()
        # Whether the last operation's final reply has been read: if not, the
        # stream is out of step and must be dropped.
        self.in_step = True

    def replies(self, op: pb.MailboxOp) -> Iterator[pb.MailboxReply]:
        """Send ``op``; its replies, up to the one without ``more``.

        Raises:
            grpc.RpcError: The stream ended (the caller drops it).
        """
        self.in_step = False
        self._requests.put(op)
        while True:
            try:
                reply: pb.MailboxReply = next(self._replies)
            except StopIteration:
                raise _StreamEnded() from None
            self.in_step = not reply.more
            yield reply
            if self.in_step:
                return

    def close(self) -> None:
        """End the stream (also what a caller does if an operation is cut off half-way)."""
        self._requests.put(None)
        with contextlib.suppress(Exception):
            self._replies.cancel()


class _StreamEnded(grpc.RpcError):
    """The parent ended the mailbox stream without an error."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the mailbox stream ended"


# A stream ended with one of these never ran the operation it carried: the
# stream was refused (rate or concurrency caps, a parent without it), or the
# operation was refused as it was read (the per-message charge).
_REFUSED_BEFORE_RUNNING = frozenset({"RESOURCE_EXHAUSTED", "UNIMPLEMENTED", "PERMISSION_DENIED"})
# How often the mailbox stream may break before the runtime stops reopening it.
MAX_STREAM_BREAKS = 3


class Mailbox:
    """The proxy mailbox: the parent owns the real connection and every key.

    Bodies are plaintext here; the parent seals them for the modeller and opens
    what the modeller sends. Bodies of any size up to the task's limit work:
    they travel in chunks, or raw over the bulk socket when large. Small
    operations go over one long-lived stream (no call set-up per message)
    whenever no other thread is using it; otherwise each is a call of its own.
    """

    def __init__(
        self,
        client: ParentClient,
        chunk_bytes: int,
        max_message_bytes: int,
        modeller_ready: threading.Event | None = None,
    ) -> None:
        self._client = client
        self._chunk = max(1024, chunk_bytes)
        self.max_message_bytes = max_message_bytes
        # Set when the modeller said it is ready (the runtime's heartbeat owns the event).
        self.modeller_ready = modeller_ready if modeller_ready is not None else threading.Event()
        self._stream: _OpStream | None = None
        self._stream_lock = threading.Lock()
        self._stream_breaks = 0
        # The parent refuses a call of a kind beyond its open-call cap (the
        # contract's): threads past it wait here for a slot instead.
        self._sends = threading.BoundedSemaphore(MAX_OPEN_SENDS)
        self._receives = threading.BoundedSemaphore(MAX_OPEN_RECEIVES)
        self._share_receives = threading.BoundedSemaphore(MAX_OPEN_SHARE_RECEIVES)

    def _take_stream(self) -> _OpStream | None:
        """The mailbox stream, held for one operation; ``None`` if busy or given up on."""
        with self._stream_lock:
            if self._stream is None:
                if self._stream_breaks >= MAX_STREAM_BREAKS:
                    return None
                try:
                    self._stream = _OpStream(self._client)
                except Exception:
                    self._stream_breaks += 1
                    return None
            stream = self._stream
        return stream if stream.lock.acquire(blocking=False) else None

    def _release_stream(self, stream: _OpStream, *, broken: bool = False) -> None:
        if broken:
            stream.close()
            with self._stream_lock:
                if self._stream is stream:
                    self._stream = None
                    self._stream_breaks += 1
        stream.lock.release()

    def _on_stream(self, op: pb.MailboxOp, handle: Callable[[Iterator[pb.MailboxReply]], _R]) -> _R | None:
        """``handle`` of ``op``'s replies over the stream; ``None`` if the op must go by a call instead.

        Raises:
            grpc.RpcError: The stream broke after the operation was sent (it is dropped).
        """
        stream = self._take_stream()
        if stream is None:
            return None
        try:
            return handle(stream.replies(op))
        except grpc.RpcError as exc:
            if _status(exc)[0] in _REFUSED_BEFORE_RUNNING:
                return None  # the call path backs off (rate) and retries
            raise
        finally:
            self._release_stream(stream, broken=not stream.in_step)

    # -- generic -------------------------------------------------------
    def send(self, message_type: str, body: bytes | bytearray | memoryview) -> None:
        """Send ``body`` to the modeller as a ``message_type`` message.

        Raises:
            MailboxError: The parent refused it (too large, type not allowed).
        """
        kind = _type_value(message_type)
        view = memoryview(body).cast("B")
        if len(view) > self.max_message_bytes:
            raise MailboxError(
                f"{message_type} body is {len(view)} bytes; the limit is {self.max_message_bytes}",
                "RESOURCE_EXHAUSTED",
            )
        self._client.count(mailbox=1)
        # Large bodies go raw over the bulk socket, or over gRPC below when the
        # parent has no bulk ticket free (receives hold them all).
        bulk = len(view) >= BULK_MIN_BYTES and self._client.bulk_path is not None
        if bulk and self._send_bulk(kind, message_type, view):
            return
        if len(view) <= self._chunk:
            op = pb.MailboxOp(send=pb.MessageChunk(type=kind, total_size=len(view), data=bytes(view)))
            try:
                reply = self._on_stream(op, _single)
            except grpc.RpcError as exc:
                code, details = _status(exc)
                raise MailboxError(f"send {message_type} failed: {details}", code) from None
            if reply is not None:
                if reply.error_code:
                    raise MailboxError(f"send {message_type} failed: {reply.error_message}", reply.error_code)
                return
        step = self._chunk

        def chunks() -> Iterator[pb.MessageChunk]:
            yield pb.MessageChunk(type=kind, total_size=len(view), data=bytes(view[:step]))
            for start in range(step, len(view), step):
                yield pb.MessageChunk(data=bytes(view[start : start + step]))

        try:
            with self._sends:
                self._client.call(
                    lambda: self._client.stub.SendMessage(
                        chunks(), metadata=self._client.metadata, timeout=BULK_TIMEOUT_S
                    )
                )
        except grpc.RpcError as exc:
            code, details = _status(exc)
            raise MailboxError(f"send {message_type} failed: {details}", code) from None

    def _send_bulk(self, kind: str, message_type: str, view: memoryview) -> bool:
        """Send a large body as raw bytes over the bulk socket, after a ticket from the parent.

        Returns:
            ``False`` (nothing sent) if the parent had no ticket free.
        """
        with self._client.bulk_slots:
            try:
                ticket = self._client.call(
                    lambda: self._client.stub.OpenBulkSend(
                        pb.BulkSendRequest(type=kind, total_size=len(view)),
                        metadata=self._client.metadata,
                        timeout=BULK_TIMEOUT_S,
                    )
                ).ticket
            except grpc.RpcError as exc:
                if _trailer(exc, BULK_BUSY_TRAILER):
                    return False
                code, details = _status(exc)
                raise MailboxError(f"send {message_type} failed: {details}", code) from None
            try:
                with self._client.bulk_connect(ticket) as sock:
                    sock.sendall(view)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_WR)
                    status = _recv_all(sock, BULK_STATUS_MAX_BYTES)
            except OSError as exc:
                raise MailboxError(
                    f"send {message_type} failed: the bulk transfer broke ({exc})", "UNAVAILABLE"
                ) from None
            text = status.decode("utf-8", "replace")
            if text != "OK":
                code, _, details = text.partition(" ")
                if not text:
                    code, details = "UNAVAILABLE", "the parent closed the bulk transfer without a status"
                raise MailboxError(f"send {message_type} failed: {details}", code)
        return True

    def receive(self, message_type: str, timeout: float = 60.0) -> bytes:
        """Wait up to ``timeout`` seconds for the modeller's next ``message_type`` message.

        Raises:
            MailboxTimeout: Nothing arrived in time.
            MailboxError: The parent refused the request or the message.
        """
        kind = _type_value(message_type)
        self._client.count(mailbox=1)
        try:
            op = pb.MailboxOp(receive=self._receive_request(kind, timeout))
            body = self._on_stream(op, lambda replies: self._receive_replies(message_type, replies))
            if body is not None:
                return body
            with self._receives:
                return self._client.call(lambda: self._receive(kind, message_type, timeout))
        except grpc.RpcError as exc:
            code, details = _status(exc)
            if code == "DEADLINE_EXCEEDED":
                raise MailboxTimeout(f"no {message_type} message within {timeout:g} s", code) from None
            raise MailboxError(f"receive {message_type} failed: {details}", code) from None

    def _receive(self, kind: str, message_type: str, timeout: float) -> bytes:
        """One ReceiveMessage call, its chunks written straight into the body; RpcErrors propagate.

        The body is one ``bytes`` object filled as the chunks arrive, so a
        large model is held once, not once in a buffer and again as bytes.
        """
        bulk = self._client.bulk_path is not None
        stream = self._client.stub.ReceiveMessage(
            self._receive_request(kind, timeout),
            metadata=self._client.metadata,
            timeout=timeout + BULK_TIMEOUT_S,
        )
        body: _Body | None = None
        for chunk in stream:
            if body is None:
                if chunk.total_size > self.max_message_bytes:
                    stream.cancel()
                    raise MailboxError(f"{message_type} body exceeds the limit", "RESOURCE_EXHAUSTED")
                body = _Body(chunk.total_size)
                if chunk.bulk_ticket and bulk:
                    return self._receive_bulk(message_type, body, chunk.bulk_ticket)
            if not body.add(chunk.data):
                stream.cancel()
                raise MailboxError(f"{message_type} body is longer than announced", "DATA_LOSS")
        if body is None or not body.complete:
            raise MailboxError(f"{message_type} body arrived incomplete", "DATA_LOSS")
        return body.value

    def _receive_request(self, kind: str, timeout: float) -> pb.ReceiveMessageRequest:
        return pb.ReceiveMessageRequest(
            type=kind,
            timeout_ms=int(timeout * 1000),
            bulk_min_bytes=BULK_MIN_BYTES if self._client.bulk_path is not None else 0,
        )

    def _receive_replies(self, message_type: str, replies: Iterator[pb.MailboxReply]) -> bytes:
        """A body from the stream's replies to a receive (a timeout or refusal raises)."""
        body: _Body | None = None
        for reply in replies:
            if reply.error_code:
                if reply.error_code == "DEADLINE_EXCEEDED":
                    raise MailboxTimeout(reply.error_message, reply.error_code)
                raise MailboxError(f"receive {message_type} failed: {reply.error_message}", reply.error_code)
            chunk = reply.chunk
            if body is None:
                if chunk.total_size > self.max_message_bytes:
                    raise MailboxError(f"{message_type} body exceeds the limit", "RESOURCE_EXHAUSTED")
                body = _Body(chunk.total_size)
                if chunk.bulk_ticket:
                    return self._receive_bulk(message_type, body, chunk.bulk_ticket)
            if not body.add(chunk.data):
                raise MailboxError(f"{message_type} body is longer than announced", "DATA_LOSS")
        if body is None or not body.complete:
            raise MailboxError(f"{message_type} body arrived incomplete", "DATA_LOSS")
        return body.value

    def _receive_bulk(self, message_type: str, body: _Body, ticket: bytes) -> bytes:
        """The body, read raw from the bulk socket straight into place."""
        with self._client.bulk_slots:
            try:
                with self._client.bulk_connect(ticket) as sock:
                    body.fill_from(sock)
                    extra = sock.recv(1) if body.complete else b""
            except OSError as exc:
                raise MailboxError(
                    f"receive {message_type} failed: the bulk transfer broke ({exc})", "UNAVAILABLE"
                ) from None
            if not body.complete or extra:
                # The parent stops at a segment that fails authentication: never hand on a part.
                raise MailboxError(
                    f"{message_type} body arrived incomplete (a message from the modeller failed "
                    "authentication, or the transfer was cut)",
                    "DATA_LOSS",
                )
            return body.value

    def wait_for_modeller(self, timeout: float | None = None) -> bool:
        """Block until the modeller has said it is ready (its TASK_START); ``False`` on timeout."""
        return self.modeller_ready.wait(timeout)

    # -- what the pod tells the modeller -------------------------------
    def send_task_start(self) -> None:
        """Tell the modeller the task has started on this pod."""
        self.send(MessageType.TASK_START, b"")

    def send_preparing_data_batches(self) -> None:
        """Tell the modeller the pod is preparing data batches."""
        self.send(MessageType.PREPARING_DATA_BATCHES, b"")

    def send_task_abort(
        self, message: str, reason: str = "", exception_type: str = "", traceback: str = ""
    ) -> None:
        """Tell the modeller the task is aborting, with a message a user can read."""
        self.send(MessageType.TASK_ABORT, task_abort_body(message, reason, exception_type, traceback))

    def send_number_of_batches(self, number: int) -> None:
        """Tell the modeller how many batches the pod will process."""
        self.send(MessageType.NUMBER_OF_BATCHES, number_of_batches_body(number))

    def send_batches_complete(self, state: str) -> None:
        """Tell the modeller batching has finished, and in what state."""
        self.send(MessageType.BATCHES_COMPLETE, batches_complete_body(state))

    def send_current_batch_id(self, batch_id: int) -> None:
        """Tell the modeller which batch is being processed."""
        self.send(MessageType.CURRENT_BATCH_ID, current_batch_id_body(batch_id))

    def send_training_update(self, update: bytes | bytearray | memoryview) -> None:
        """Send a training update (model parameters, gradients) of any size."""
        self.send(MessageType.TRAINING_UPDATE, update)

    # -- what the modeller tells the pod -------------------------------
    def await_algorithm_exchange(self, timeout: float = 60.0) -> bytes:
        """The modeller's next ALGORITHM_EXCHANGE body (e.g. new global weights)."""
        return self.receive(MessageType.ALGORITHM_EXCHANGE, timeout)

    def await_training_complete(self, timeout: float = 60.0) -> bytes:
        """The modeller's TRAINING_COMPLETE body."""
        return self.receive(MessageType.TRAINING_COMPLETE, timeout)

    def await_task_complete(self, timeout: float = 60.0) -> bytes:
        """The modeller's TASK_COMPLETE body."""
        return self.receive(MessageType.TASK_COMPLETE, timeout)

    def await_modeller_response(self, timeout: float = 60.0) -> bytes:
        """The modeller's next MODELLER_RESPONSE body."""
        return self.receive(MessageType.MODELLER_RESPONSE, timeout)

    # -- secure aggregation between pods -------------------------------
    def send_secure_shares(self, shares: dict[str, bytes]) -> None:
        """Send one share to each named peer pod; the parent seals each with its key."""
        self._client.count(mailbox=1)
        try:
            self._client.call(
                lambda: self._client.stub.SendSecureShares(
                    pb.SecureShares(shares={k: bytes(v) for k, v in shares.items()}),
                    metadata=self._client.metadata,
                    timeout=RPC_TIMEOUT_S,
                )
            )
        except grpc.RpcError as exc:
            code, details = _status(exc)
            raise MailboxError(f"send secure shares failed: {details}", code) from None

    def get_secure_shares(self, timeout: float = 60.0) -> dict[str, bytes]:
        """One share from every peer pod, by pod identifier.

        Raises:
            MailboxTimeout: Not every peer's share arrived in time.
        """
        self._client.count(mailbox=1)
        try:
            with self._share_receives:
                reply = self._client.stub.GetSecureShares(
                    pb.GetSecureSharesRequest(timeout_ms=int(timeout * 1000)),
                    metadata=self._client.metadata,
                    timeout=timeout + RPC_TIMEOUT_S,
                )
        except grpc.RpcError as exc:
            code, details = _status(exc)
            if code == "DEADLINE_EXCEEDED":
                raise MailboxTimeout(f"secure shares did not all arrive within {timeout:g} s", code) from None
            raise MailboxError(f"get secure shares failed: {details}", code) from None
        return {k: bytes(v) for k, v in reply.shares.items()}
