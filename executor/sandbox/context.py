"""What a protocol's ``run(ctx)`` receives: the task, the data, the mailbox, progress.

What protocol code may catch from ``ctx`` is one tree; no ``grpc`` exception
ever reaches it::

    SandboxError            anything ctx reports as failed
    ├── TaskAborted         raised by ctx.abort(): the task ends with status ABORT
    ├── MailboxError        the parent refused or failed a mailbox or share operation
    │   └── MailboxTimeout  nothing arrived in time (also a TimeoutError)
    └── ReportRefused       a progress, file or result-rows report was refused (also a ValueError)

Each carries ``code``, the gRPC status name the parent answered with (empty
when the refusal was local), so a protocol can tell a limit from a lost parent.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import math
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc

from executor.sandbox.contract import (
    BULK_BUSY_TRAILER,
    BULK_MAGIC,
    BULK_MIN_BYTES,
    BULK_STATUS_MAX_BYTES,
    MAX_BULK_CONNECTIONS,
    MAX_BULK_TICKETS,
    MAX_COLUMN_NAME_CHARS,
    MAX_COLUMNS,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_ERROR_TYPE_CHARS,
    MAX_FILE_REASON_CHARS,
    MAX_INFO_CHARS,
    MAX_OPEN_RECEIVES,
    MAX_OPEN_SENDS,
    MAX_OPEN_SHARE_RECEIVES,
    MAX_ROW_BYTES,
    MAX_ROW_INT,
    MAX_ROWS_BYTES_PER_CALL,
    MAX_ROWS_PER_CALL,
    MAX_TRACEBACK_CHARS,
    MIN_ROW_INT,
    PROGRESS_STEP_INTERVAL_S,
    RATE_LIMITED_TRAILER,
    TOKEN_METADATA_KEY,
    is_column_name,
)
from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc

_R = TypeVar("_R")

RPC_TIMEOUT_S = 30.0
RATE_RETRIES = 12
RATE_BACKOFF_S = 0.005
# Generous: a 256 MiB body at tens of MiB/s still fits.
BULK_TIMEOUT_S = 600.0
# While the bulk socket's backlog is full, the connect is retried this often (doubling up to the max).
CONNECT_RETRY_S = 0.002
CONNECT_RETRY_MAX_S = 0.05


class SandboxError(Exception):
    """Root of every exception ``ctx`` raises to protocol code.

    Attributes:
        code: The gRPC status name the parent answered with, or ``""``.
    """

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class TaskAborted(SandboxError):
    """Raised by :meth:`Context.abort`: the task ends with status ABORT."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class MailboxError(SandboxError):
    """The parent refused or failed a mailbox operation."""


class MailboxTimeout(MailboxError, TimeoutError):
    """No message of the requested type arrived in time."""


class ReportRefused(SandboxError, ValueError):
    """A progress event, a per-file outcome or result rows were refused (bad value, cap reached, gone).

    ``code`` is empty when the sandbox refused them itself, before any call.
    """


def _status(exc: grpc.RpcError) -> tuple[str, str]:
    """The status name and public message of a failed call (any RpcError, even one without them)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    return (code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"), str(details or "no detail")


class ParentClient:
    """The authenticated stub and the counters the heartbeat reports."""

    def __init__(
        self,
        stub: pb_grpc.SandboxStub,
        metadata: tuple[tuple[str, str], ...],
        bulk_path: str | None = None,
    ) -> None:
        self.stub = stub
        self.metadata = metadata
        # The parent's bulk socket (large bodies as raw bytes), if it has one.
        self.bulk_path = bulk_path
        # The parent serves so many bulk transfers at once and refuses more (the
        # contract's caps): a transfer holds a slot from its ticket to its end, and
        # threads past them wait here instead of failing.
        self.bulk_slots = threading.BoundedSemaphore(min(MAX_BULK_CONNECTIONS, MAX_BULK_TICKETS))
        self._lock = threading.Lock()
        self.progress_events = 0
        self.mailbox_ops = 0
        # How many calls the parent's rate cap refused (each then retried).
        self.rate_limited = 0

    def call(self, rpc: Callable[[], _R]) -> _R:
        """Run ``rpc``, backing off while the parent says the task calls too fast.

        The parent caps each task's call rate; a protocol that reports
        progress or exchanges messages very quickly is slowed down, not failed.
        """
        delay = RATE_BACKOFF_S
        for attempt in range(RATE_RETRIES):
            try:
                return rpc()
            except grpc.RpcError as exc:
                if not _rate_limited(exc) or attempt == RATE_RETRIES - 1:
                    raise
            with self._lock:
                self.rate_limited += 1
            time.sleep(delay)
            delay = min(delay * 2, 0.5)
        raise AssertionError("unreachable")

    def bulk_connect(self, ticket: bytes) -> socket.socket:
        """A connection to the bulk socket that has presented the task's token and ``ticket``.

        Raises:
            OSError: The socket cannot be reached.
        """
        assert self.bulk_path is not None
        token = dict(self.metadata)[TOKEN_METADATA_KEY].encode()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(BULK_TIMEOUT_S)
            _connect_within(sock, self.bulk_path, time.monotonic() + BULK_TIMEOUT_S)
            sock.sendall(BULK_MAGIC + bytes([len(token)]) + token + ticket)
        except BaseException:
            sock.close()
            raise
        return sock

    def count(self, *, progress: int = 0, mailbox: int = 0) -> None:
        """Add to the counters the next beat carries."""
        with self._lock:
            self.progress_events += progress
            self.mailbox_ops += mailbox


def _connect_within(sock: socket.socket, path: str, deadline: float) -> None:
    """Connect ``sock`` (it has a timeout) to the Unix socket ``path``, waiting for room till ``deadline``.

    A socket with a timeout is non-blocking underneath, and a non-blocking
    connect to a Unix listener whose backlog is full fails at once with
    EAGAIN instead of waiting as a blocking one would: a parent slow to
    accept (a busy host) must cost this transfer time, not its failure.

    Raises:
        OSError: Another failure, or no room by ``deadline`` (``TimeoutError``).
    """
    delay = CONNECT_RETRY_S
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no room in {path}'s backlog before the deadline") from None
            time.sleep(min(delay, left))
            delay = min(delay * 2, CONNECT_RETRY_MAX_S)


def _rate_limited(exc: grpc.RpcError) -> bool:
    """Whether the parent refused a call only for its rate (the contract's trailer says so)."""
    return _trailer(exc, RATE_LIMITED_TRAILER)


def _trailer(exc: grpc.RpcError, key: str) -> bool:
    """Whether ``exc`` is a RESOURCE_EXHAUSTED refusal carrying the contract's trailer ``key``."""
    if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    trailers = getattr(exc, "trailing_metadata", lambda: ())() or ()
    return any(k == key for k, _ in trailers)


# Where a bytes object's data starts (CPython: the header, then ob_sval).
_BYTES_DATA_OFFSET = bytes.__basicsize__ - 1


def _bytes_maker() -> Any:
    """CPython's ``PyBytes_FromStringAndSize``, or ``None`` where there is no such thing."""
    try:
        make = ctypes.pythonapi.PyBytes_FromStringAndSize
    except (AttributeError, OSError):
        return None
    make.restype = ctypes.py_object
    make.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
    return make


_new_bytes: Any = _bytes_maker()


class _Body:
    """A received body of an announced size, written chunk by chunk into its final ``bytes``.

    CPython builds a ``bytes`` of a given size and lets its maker fill it
    before anyone else holds it (``PyBytes_FromStringAndSize(NULL, n)``); the
    object is handed out only once complete, so nothing ever sees it change.
    Elsewhere a ``bytearray`` is filled and copied once.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._filled = 0
        self._buffer: bytearray | None = None
        if _new_bytes is not None and size:
            self._bytes = _new_bytes(None, size)
            self._address = id(self._bytes) + _BYTES_DATA_OFFSET
        else:
            self._bytes = b""
            self._buffer = bytearray(size)

    def add(self, data: bytes) -> bool:
        """Append ``data``; ``False`` (and nothing written) if it would pass the announced size."""
        end = self._filled + len(data)
        if end > self._size:
            return False
        if self._buffer is not None:
            self._buffer[self._filled : end] = data
        elif data:
            ctypes.memmove(self._address + self._filled, data, len(data))
        self._filled = end
        return True

    def fill_from(self, sock: socket.socket) -> None:
        """Read the rest of the body from ``sock`` straight into place; stops at end-of-file.

        Raises:
            OSError: The connection failed or stalled.
        """
        if self._buffer is not None:
            view = memoryview(self._buffer)
        else:
            view = memoryview((ctypes.c_char * self._size).from_address(self._address)).cast("B")
        while self._filled < self._size:
            n = sock.recv_into(view[self._filled :])
            if n == 0:
                return
            self._filled += n

    @property
    def complete(self) -> bool:
        """Whether every announced byte arrived."""
        return self._filled == self._size

    @property
    def value(self) -> bytes:
        """The body (once complete)."""
        return bytes(self._buffer) if self._buffer is not None else self._bytes


def _single(replies: Iterator[pb.MailboxReply]) -> pb.MailboxReply:
    """The one reply of an operation that has one."""
    reply = next(replies)
    for _ in replies:  # a well-behaved parent sends none; the stream must stay in step
        pass
    return reply


def _recv_all(sock: socket.socket, limit: int) -> bytes:
    """Everything ``sock`` sends until end-of-file, at most ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    while size < limit:
        data = sock.recv(limit - size)
        if not data:
            break
        parts.append(data)
        size += len(data)
    return b"".join(parts)


def _type_value(message_type: str) -> str:
    if message_type not in pb.MessageType.keys():  # noqa: SIM118 (an enum wrapper, not a dict)
        raise ValueError(f"unknown message type {message_type!r}")
    return message_type


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

    def __init__(self, client: ParentClient, chunk_bytes: int, max_message_bytes: int) -> None:
        self._client = client
        self._chunk = max(1024, chunk_bytes)
        self.max_message_bytes = max_message_bytes
        self.modeller_ready = threading.Event()
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
        self.send("TASK_START", b"")

    def send_preparing_data_batches(self) -> None:
        """Tell the modeller the pod is preparing data batches."""
        self.send("PREPARING_DATA_BATCHES", b"")

    def send_task_abort(
        self, message: str, reason: str = "", exception_type: str = "", traceback: str = ""
    ) -> None:
        """Tell the modeller the task is aborting, with a message a user can read."""
        self.send(
            "TASK_ABORT",
            _json(
                {
                    "message": message[:MAX_ERROR_MESSAGE_CHARS],
                    "reason": reason[:MAX_ERROR_TYPE_CHARS],
                    "exception_type": exception_type[:MAX_ERROR_TYPE_CHARS],
                    "traceback": traceback[-MAX_TRACEBACK_CHARS:],
                }
            ),
        )

    def send_number_of_batches(self, number: int) -> None:
        """Tell the modeller how many batches the pod will process."""
        self.send("NUMBER_OF_BATCHES", _json({"number_of_batches": int(number)}))

    def send_batches_complete(self, state: str) -> None:
        """Tell the modeller batching has finished, and in what state."""
        self.send("BATCHES_COMPLETE", _json({"state": str(state)[:200]}))

    def send_current_batch_id(self, batch_id: int) -> None:
        """Tell the modeller which batch is being processed."""
        self.send("CURRENT_BATCH_ID", _json({"batch_id": int(batch_id)}))

    def send_training_update(self, update: bytes | bytearray | memoryview) -> None:
        """Send a training update (model parameters, gradients) of any size."""
        self.send("TRAINING_UPDATE", update)

    # -- what the modeller tells the pod -------------------------------
    def await_algorithm_exchange(self, timeout: float = 60.0) -> bytes:
        """The modeller's next ALGORITHM_EXCHANGE body (e.g. new global weights)."""
        return self.receive("ALGORITHM_EXCHANGE", timeout)

    def await_training_complete(self, timeout: float = 60.0) -> bytes:
        """The modeller's TRAINING_COMPLETE body."""
        return self.receive("TRAINING_COMPLETE", timeout)

    def await_task_complete(self, timeout: float = 60.0) -> bytes:
        """The modeller's TASK_COMPLETE body."""
        return self.receive("TASK_COMPLETE", timeout)

    def await_modeller_response(self, timeout: float = 60.0) -> bytes:
        """The modeller's next MODELLER_RESPONSE body."""
        return self.receive("MODELLER_RESPONSE", timeout)

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


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value).encode()


class Progress:
    """Progress events: they feed the operator's progress bars.

    Run and epoch boundaries go to the parent as they are reported. Steps
    are coalesced: at most one per
    :data:`~executor.sandbox.contract.PROGRESS_STEP_INTERVAL_S` is sent; one
    reported sooner waits, replaced by any later one, and is sent when the
    interval is up (from a thread of its own), before the next boundary, or
    before the result, whichever comes first. So ``step`` may be called
    every iteration of a tight loop: it costs a call only a few times a
    second, and the last step is never lost.
    """

    def __init__(self, client: ParentClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._due = threading.Condition(self._lock)
        self._pending: dict[str, Any] | None = None
        self._last_step: float | None = None
        self._flusher: threading.Thread | None = None

    def _report(self, kind: str, **fields: Any) -> None:
        """Send one progress event.

        Raises:
            ReportRefused: The parent refused it or could not be reached.
        """
        try:
            self._client.call(
                lambda: self._client.stub.ReportProgress(
                    pb.ProgressEvent(kind=kind, **fields),
                    metadata=self._client.metadata,
                    timeout=RPC_TIMEOUT_S,
                )
            )
        except grpc.RpcError as exc:
            code, details = _status(exc)
            raise ReportRefused(f"progress event {kind} refused: {details}", code) from None

    def _boundary(self, kind: str, **fields: Any) -> None:
        """A run or epoch boundary: the step waiting (if any) first, then it."""
        self._client.count(progress=1)
        self.flush()
        self._report(kind, **fields)

    def flush(self) -> None:
        """Send the step that is waiting, if any (best effort: a later report supersedes it)."""
        with self._lock:
            fields, self._pending = self._pending, None
            if fields is not None:
                self._last_step = time.monotonic()
        if fields is not None:
            with contextlib.suppress(ReportRefused):
                self._report("STEP", **fields)

    def run_start(self) -> None:
        """The protocol's main work begins."""
        self._boundary("RUN_START")

    def run_end(self) -> None:
        """The protocol's main work is done."""
        self._boundary("RUN_END")

    def epoch_start(self, epoch: int, max_epochs: int) -> None:
        """Epoch ``epoch`` (1-based) of ``max_epochs`` begins."""
        self._boundary("EPOCH_START", current_epoch=epoch, max_epochs=max_epochs)

    def epoch_end(self, epoch: int, max_epochs: int) -> None:
        """Epoch ``epoch`` of ``max_epochs`` is done."""
        self._boundary("EPOCH_END", current_epoch=epoch, max_epochs=max_epochs)

    def step(
        self, current: int, total: int = 0, info: str = "", *, epoch: int = 0, max_epochs: int = 0
    ) -> None:
        """``current`` of ``total`` units done, with an optional short note (coalesced, see above).

        Raises:
            ReportRefused: ``info`` is not text (a lone surrogate), or the
                parent refused a step sent now or could not be reached.
        """
        info = info[:MAX_INFO_CHARS]
        try:
            info.encode("utf-8")
        except UnicodeEncodeError:
            raise ReportRefused("progress step refused: its info holds a lone surrogate") from None
        fields = {
            "current": current,
            "total": total,
            "info": info,
            "current_epoch": epoch,
            "max_epochs": max_epochs,
        }
        self._client.count(progress=1)  # every step counts as activity for the parent's stall watch
        with self._lock:
            now = time.monotonic()
            send_now = self._pending is None and (
                self._last_step is None or now - self._last_step >= PROGRESS_STEP_INTERVAL_S
            )
            if send_now:
                self._last_step = now
            else:
                self._pending = fields
                if self._flusher is None:
                    self._flusher = threading.Thread(
                        target=self._flush_when_due, name="progress", daemon=True
                    )
                    self._flusher.start()
                self._due.notify()
        if send_now:
            self._report("STEP", **fields)

    def _flush_when_due(self) -> None:
        """The flusher thread: a waiting step is sent once its interval is up."""
        while True:
            with self._lock:
                while self._pending is None:
                    self._due.wait()
                last = self._last_step if self._last_step is not None else 0.0
                wait = last + PROGRESS_STEP_INTERVAL_S - time.monotonic()
                if wait > 0:
                    self._due.wait(wait)
                    continue
            self.flush()


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
        secrets: The secrets the project's policy grants, by name (usually none).
        data_dir: The datasource, read-only.
        scratch_dir: A small writable directory (memory-backed, not executable).
        mailbox: The proxy mailbox.
        progress: Progress reporting.

    Besides these: :meth:`save_results` hands result rows to the parent (which
    stores them, e.g. in the pod's project database), :meth:`file_processed`
    and :meth:`file_failed` report per-file outcomes, and :meth:`abort` ends
    the task with status ABORT. What the protocol logs with :mod:`logging`
    (INFO and above, unless it configures logging itself) or prints reaches
    the parent's log of the task.
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
        self.secrets = dict(config.secrets)
        self.data_dir = Path(config.data_path)
        self.scratch_dir = scratch_dir
        self._client = client
        self.mailbox = Mailbox(client, config.chunk_bytes, config.max_message_bytes)
        self.progress = Progress(client)

    def save_results(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Hand result rows to the parent, which validates and keeps them.

        Each row maps column names to JSON scalars: ``str``, ``int`` (within
        signed 64 bits), finite ``float``, ``bool`` or ``None``. No nested
        lists or dicts, 1 to 256 columns, names of 1 to 128 characters with
        no control characters, at most 64 KiB of JSON per row. Rows travel in
        calls of up to 1000 rows (and 1 MiB); one sandbox (a task, or one
        batch of a batched task) may save 100,000 rows and 32 MiB in all.
        For example::

            ctx.save_results([{"file": "a.csv", "rows": 120, "mean": 4.2}])

        Every row is checked here before anything is sent, so a bad row sends
        nothing. The parent accepts or refuses each call whole: if it refuses
        one (a per-task cap, or the task has finished), the rows of the calls
        before it are kept, and the message says how many.

        Raises:
            ReportRefused: A row is not such a mapping (``code`` empty), or the
                parent refused a call (``code`` says why) or is gone.
        """
        if isinstance(rows, (Mapping, str, bytes)):
            raise ReportRefused("save_results takes an iterable of rows (dicts); wrap a single row in a list")
        texts = [_row_text(index, row) for index, row in enumerate(rows)]
        saved = 0
        for batch in _row_calls(texts):
            try:
                self._send_rows(batch)
            except grpc.RpcError as exc:
                code, details = _status(exc)
                raise ReportRefused(
                    f"result rows {saved} to {saved + len(batch) - 1} refused: {details} "
                    f"({saved} row(s) of this call saved before them)",
                    code,
                ) from None
            saved += len(batch)

    def _send_rows(self, rows_json: list[str]) -> None:
        """One SaveResults call; RpcErrors propagate."""
        client = self._client
        client.count(progress=1)
        request = pb.ResultRows(rows_json=rows_json)
        client.call(lambda: client.stub.SaveResults(request, metadata=client.metadata, timeout=RPC_TIMEOUT_S))

    def file_processed(self, name: str) -> None:
        """Record that datasource file ``name`` (relative to ``data_dir``) was processed.

        Raises:
            ReportRefused: The name is not a plain regular file of the datasource,
                a cap is reached, or the parent is gone.
        """
        self._report_file(name, "PROCESSED", "")

    def file_failed(self, name: str, reason: str) -> None:
        """Record that datasource file ``name`` failed, and why.

        Raises:
            ReportRefused: As for :meth:`file_processed`.
        """
        self._report_file(name, "FAILED", reason)

    def _report_file(self, name: str, kind: str, reason: str) -> None:
        client = self.mailbox._client
        client.count(progress=1)
        try:
            client.call(
                lambda: client.stub.ReportFiles(
                    pb.FileOutcomes(
                        files=[pb.FileOutcome(name=name, kind=kind, reason=reason[:MAX_FILE_REASON_CHARS])]
                    ),
                    metadata=client.metadata,
                    timeout=RPC_TIMEOUT_S,
                )
            )
        except grpc.RpcError as exc:
            code, details = _status(exc)
            raise ReportRefused(f"file outcome for {name!r} refused: {details}", code) from None

    def abort(self, message: str, reason: str = "") -> NoReturn:
        """End the task now with status ABORT and a message for the modeller."""
        raise TaskAborted(message, reason)


def _row_text(index: int, row: object) -> str:
    """One result row as compact JSON text, after the checks the parent makes.

    Raises:
        ReportRefused: The row breaks one (with no code: nothing was sent).
    """
    if not isinstance(row, Mapping):
        raise ReportRefused(f"result row {index} is a {type(row).__name__}, not a dict of column -> value")
    if not 0 < len(row) <= MAX_COLUMNS:
        raise ReportRefused(f"result row {index} has {len(row)} columns; 1 to {MAX_COLUMNS} are allowed")
    for name, value in row.items():
        if not is_column_name(name):
            raise ReportRefused(
                f"result row {index}: column name {_short(name)} is not a string of 1 to "
                f"{MAX_COLUMN_NAME_CHARS} characters free of control characters and lone surrogates"
            )
        if value is None or isinstance(value, (str, bool)):
            continue
        if isinstance(value, int):
            if not MIN_ROW_INT <= value <= MAX_ROW_INT:
                raise ReportRefused(f"result row {index}, column {name!r}: integer outside signed 64 bits")
        elif isinstance(value, float):
            if not math.isfinite(value):
                raise ReportRefused(f"result row {index}, column {name!r}: {value} is not a JSON number")
        else:
            raise ReportRefused(
                f"result row {index}, column {name!r}: a {type(value).__name__} is not a JSON scalar "
                "(str, int, float, bool or None)"
            )
    text = json.dumps(dict(row), ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ReportRefused(f"result row {index} holds a lone surrogate, which is not text") from None
    if size > MAX_ROW_BYTES:
        raise ReportRefused(f"result row {index} is {size} bytes of JSON; the limit is {MAX_ROW_BYTES}")
    return text


def _row_calls(texts: list[str]) -> Iterator[list[str]]:
    """``texts`` in runs that fit one SaveResults call (rows and bytes)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        row_bytes = len(text.encode("utf-8"))
        if batch and (len(batch) == MAX_ROWS_PER_CALL or size + row_bytes > MAX_ROWS_BYTES_PER_CALL):
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += row_bytes
    if batch:
        yield batch


def _short(value: object) -> str:
    """A bounded repr for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
