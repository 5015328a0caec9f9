"""The gRPC edge of a task: authentication, the servicer and its server.

Each task gets its own server on its own Unix socket. An interceptor checks the
task's token on every call against an explicit method map that fails closed;
the servicer only converts protobuf to plain values and calls
:class:`~executor.session.TaskSession`. Errors map to a status and a public
message in one catalog; anything unexpected becomes INTERNAL with no detail.
"""

from __future__ import annotations

import functools
import hmac
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, TypeVar

import grpc

from executor.mailbox import Incoming
from executor.sandbox.context import RATE_LIMITED
from executor.session import ProgressUpdate, RequestRejected, TaskSession
from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

TOKEN_METADATA_KEY = "x-sandbox-token"  # noqa: S105 (a header name, not a secret)
SERVICE_NAME = "executor.v1.Sandbox"

# Every RPC and who may call it. A method missing here is refused, so a new
# RPC stays closed until someone decides its policy (a unit test checks that
# this map covers the service exactly).
METHOD_POLICY: dict[str, str] = {
    f"/{SERVICE_NAME}/GetTask": "task-token",
    f"/{SERVICE_NAME}/Heartbeat": "task-token",
    f"/{SERVICE_NAME}/SendMessage": "task-token",
    f"/{SERVICE_NAME}/ReceiveMessage": "task-token",
    f"/{SERVICE_NAME}/SendSecureShares": "task-token",
    f"/{SERVICE_NAME}/GetSecureShares": "task-token",
    f"/{SERVICE_NAME}/ReportProgress": "task-token",
    f"/{SERVICE_NAME}/ReportFiles": "task-token",
    f"/{SERVICE_NAME}/Finish": "task-token",
}

# RequestRejected codes a handler may return, and nothing else.
_STATUS_CATALOG: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "DATA_LOSS": grpc.StatusCode.DATA_LOSS,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
}

MAX_METADATA_BYTES = 8 * 1024
# Per task: calls per second (sustained) and burst, and how many calls of a
# kind may be open at once. A flood or a pile of half-open streams hurts
# only the task that makes it, and not even its other calls.
RATE_PER_S = 1000.0
RATE_BURST = 2000
CONCURRENCY: dict[str, int] = {
    f"/{SERVICE_NAME}/Heartbeat": 1,
    f"/{SERVICE_NAME}/SendMessage": 2,
    f"/{SERVICE_NAME}/ReceiveMessage": 4,
    f"/{SERVICE_NAME}/GetSecureShares": 1,
}
# Work inside a call is charged to the same bucket as calls, so that a
# stream of messages costs what as many calls would: each chunk of a
# mailbox body after the first, and each FILES_PER_TOKEN file outcomes.
FILES_PER_TOKEN = 10
# Beats have a bucket of their own: the runtime beats at most every 50 ms.
BEATS_PER_S = 25.0
BEAT_BURST = 50
# A task that keeps calling or streaming after its bucket is empty abuses the
# parent (each refusal still costs it work, outside the sandbox's CPU cap):
# past this many refusals, forgiven at ABUSE_FORGIVE_PER_S, all its
# connections are closed and the task ends as an error.
ABUSE_REFUSALS = 5000
ABUSE_FORGIVE_PER_S = 500.0
ABUSE_ERROR_TYPE = "RpcAbuse"
# A call must send its (first) request message this soon after its headers,
# and a body's chunks may pause at most STREAM_GAP_S: a call waiting for a
# message holds a server thread. A request normally arrives with its
# headers; at most MAX_AWAITING_REQUESTS calls of a task may still be waiting
# after REQUEST_GRACE_S (a busy parent may take that long to read one), and
# any more are cancelled then.
REQUEST_WAIT_S = 5.0
REQUEST_GRACE_S = 1.0
STREAM_GAP_S = 60.0
MAX_AWAITING_REQUESTS = 8
WATCH_TICK_S = 0.25
# A connection that carries no open call for this long is closed (grpc counts
# a connection with an open call, such as the runtime's heartbeat stream, as
# busy, so a call in progress is never cut off by this).
IDLE_CONNECTION_MS = 60_000
# Connections one task may hold open: the runtime needs one. Without a cap a
# protocol could exhaust the parent's file descriptors, which all tasks share.
MAX_CONNECTIONS = 8
HANDSHAKE_TIMEOUT_MS = 5_000
# Mailbox bodies of any size travel in chunks of at most this many bytes, so no
# single gRPC message is ever large.
CHUNK_BYTES = 1024 * 1024
ENVELOPE_HEADROOM = 64 * 1024
# Streams one connection may have open at once.
MAX_STREAMS_PER_CONNECTION = 12
# Enough threads for every call the caps let block at once (the concurrency
# caps above, plus the calls awaiting their request) and a few more. Calls
# beyond wait for a thread in order rather than being refused, so a burst of
# stalled calls delays Finish briefly but cannot refuse it; what may wait is
# bounded by the streams a task's connections may carry.
SERVER_THREADS = sum(CONCURRENCY.values()) + MAX_AWAITING_REQUESTS + 8
MAX_CONCURRENT_RPCS = MAX_CONNECTIONS * MAX_STREAMS_PER_CONNECTION

_F = TypeVar("_F", bound=Callable[..., Any])


def _abort_handler(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler that only aborts, without waiting for (or parsing) any request.

    It takes a request stream whatever the method's shape, so grpc calls it at
    once instead of first waiting for a request message that may never come.
    """

    def deny(requests: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    return grpc.stream_unary_rpc_method_handler(deny)


class _Bucket:
    """A token bucket (not locked: its owner holds a lock)."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self, cost: float) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


class CallLimiter:
    """One task's budget: calls and the work inside them, open calls, and abuse.

    Args:
        rate_per_s: Calls (and units of work) per second, sustained.
        burst: How many may come at once.
        on_abuse: Called once, with a public reason, when the task keeps
            coming after refusals (see :data:`ABUSE_REFUSALS`).
    """

    def __init__(
        self,
        rate_per_s: float = RATE_PER_S,
        burst: int = RATE_BURST,
        on_abuse: Callable[[str], None] | None = None,
    ) -> None:
        self._calls = _Bucket(rate_per_s, burst)
        self._beats = _Bucket(BEATS_PER_S, BEAT_BURST)
        self._open: dict[str, int] = {}
        self._refusals = 0.0
        self._refusals_stamp = time.monotonic()
        self._on_abuse = on_abuse
        self.abusive = False
        self._lock = threading.Lock()

    def _refuse(self, reason: str) -> str:
        """Count a refusal (lock held); return ``reason``."""
        now = time.monotonic()
        forgiven = (now - self._refusals_stamp) * ABUSE_FORGIVE_PER_S
        self._refusals = max(0.0, self._refusals - forgiven) + 1
        self._refusals_stamp = now
        if self._refusals > ABUSE_REFUSALS and not self.abusive:
            self.abusive = True
            if self._on_abuse is not None:
                threading.Thread(
                    target=self._on_abuse,
                    args=(f"the sandbox kept calling after more than {ABUSE_REFUSALS} refusals",),
                    name="rpc-abuse",
                    daemon=True,
                ).start()
        return reason

    def take(self) -> str | None:
        """Charge one call to the bucket; the reason it is refused, or ``None``."""
        with self._lock:
            return None if self._calls.take(1) else self._refuse(RATE_LIMITED)

    def charge(self, units: float) -> str | None:
        """Charge ``units`` of work inside a call; the reason it is refused, or ``None``."""
        if units <= 0:
            return None
        with self._lock:
            return None if self._calls.take(units) else self._refuse(RATE_LIMITED)

    def beat(self) -> str | None:
        """Charge one heartbeat; the reason it is refused, or ``None``."""
        with self._lock:
            return None if self._beats.take(1) else self._refuse("heartbeat rate limit exceeded")

    def open(self, method: str) -> str | None:
        """Take a slot for an open call to ``method``; the reason it is refused, or ``None``."""
        with self._lock:
            cap = CONCURRENCY.get(method)
            if cap is not None and self._open.get(method, 0) >= cap:
                return self._refuse(f"at most {cap} {method.rsplit('/', 1)[-1]} call(s) may be open at once")
            self._open[method] = self._open.get(method, 0) + 1
            return None

    def admit(self, method: str) -> str | None:
        """Charge a call to ``method`` and take its slot; the reason it is refused, or ``None``."""
        return self.take() or self.open(method)

    def release(self, method: str) -> None:
        """Give back the slot of a finished call."""
        with self._lock:
            self._open[method] -= 1


class RequestWatch:
    """Cancels calls whose next request message is overdue (one thread, started lazily).

    A call that sent its headers but never its message would otherwise hold
    a server thread for as long as its client likes. A first request that
    has not come after :data:`REQUEST_GRACE_S` counts as awaited; past
    :data:`MAX_AWAITING_REQUESTS` such calls, more are cancelled at once.
    """

    def __init__(self) -> None:
        # key -> [deadline, context, when it counts as awaited (or None), counted]
        self._due: dict[int, list[Any]] = {}
        self._keys = itertools.count()
        self._awaiting = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cancelled = 0

    def next(
        self,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        within_s: float | None,
        first: bool = False,
    ) -> Any:
        """The next item of ``requests``, cancelling the call if it takes longer than ``within_s``.

        Raises:
            StopIteration: The client sent no more.
            grpc.RpcError: The call was cancelled (by its client, or here).
        """
        if within_s is None:
            return next(requests)
        with self._lock:
            key = next(self._keys)
            now = time.monotonic()
            self._due[key] = [now + within_s, context, now + REQUEST_GRACE_S if first else None, False]
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="rpc-request-watch", daemon=True)
                self._thread.start()
        try:
            return next(requests)
        finally:
            with self._lock:
                entry = self._due.pop(key, None)
                if entry is not None and entry[3]:
                    self._awaiting -= 1

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_TICK_S):
            now = time.monotonic()
            cancel = []
            with self._lock:
                for key, entry in list(self._due.items()):
                    deadline, context, counts_at, counted = entry
                    due_to_count = counts_at is not None and not counted and counts_at <= now
                    if deadline <= now or (due_to_count and self._awaiting >= MAX_AWAITING_REQUESTS):
                        del self._due[key]
                        if counted:
                            self._awaiting -= 1
                        cancel.append(context)
                    elif due_to_count:
                        entry[3] = True
                        self._awaiting += 1
            for context in cancel:
                self.cancelled += 1
                context.cancel()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], limiter: CallLimiter, watch: RequestWatch, method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler``, reading and parsing its own requests, within the task's budget.

    Every method is served as a request stream, so this code, not grpc, reads
    the request: a call whose request does not come within
    :data:`REQUEST_WAIT_S` is cancelled, which frees its thread and slot.
    Requests are parsed here, so a malformed one is refused with
    INVALID_ARGUMENT by our own code (grpc's failed-deserialisation path
    leaves streams behind on the connection). Each message inside a stream is
    charged to the task's budget. The concurrency slot is taken only once the
    handler really runs, so a call grpc refuses earlier (too large, over the
    server's concurrency cap) cannot leak one.
    """
    parse: Callable[[bytes], Any] = handler.request_deserializer or (lambda raw: raw)
    kwargs: dict[str, Any] = {
        "request_deserializer": None,
        "response_serializer": handler.response_serializer,
    }
    is_heartbeat = method == f"/{SERVICE_NAME}/Heartbeat"
    gap = None if is_heartbeat else STREAM_GAP_S

    def parsed(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:
            raise RequestRejected("INVALID_ARGUMENT", "malformed request") from None

    def first_raw(raws: Iterator[bytes], context: grpc.ServicerContext) -> bytes | None:
        try:
            raw: bytes = watch.next(raws, context, REQUEST_WAIT_S, first=True)
        except StopIteration:
            return None
        return raw

    def stream_of(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        raw = first_raw(raws, context)
        index = 0
        while raw is not None:
            refused = limiter.beat() if is_heartbeat else limiter.charge(1 if index else 0)
            if refused is not None:
                raise RequestRejected("RESOURCE_EXHAUSTED", refused)
            yield parsed(raw)
            index += 1
            try:
                raw = watch.next(raws, context, gap)
            except StopIteration:
                return

    def request_of(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        raw = first_raw(raws, context)
        if raw is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a request message")
        try:
            return parsed(raw)
        except RequestRejected as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.public_message)

    def first(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        if handler.request_streaming:
            return stream_of(raws, context)
        return request_of(raws, context)

    def enter(context: grpc.ServicerContext) -> None:
        refused = limiter.open(method)
        if refused is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)

    if not handler.response_streaming:
        behaviour = handler.unary_unary or handler.stream_unary
        assert behaviour is not None

        def once(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            request = first(raws, context)
            enter(context)
            try:
                return behaviour(request, context)
            finally:
                limiter.release(method)

        return grpc.stream_unary_rpc_method_handler(once, **kwargs)
    streaming = handler.unary_stream or handler.stream_stream
    assert streaming is not None

    def stream(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        request = first(raws, context)
        enter(context)
        try:
            yield from streaming(request, context)
        finally:
            limiter.release(method)

    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Admit a call only if its method is mapped, it carries this task's token, and limits allow.

    The call is charged to the task's bucket here, before grpc gives it a
    thread, so a refused call costs the parent as little as possible.
    """

    def __init__(
        self, token: str, limiter: CallLimiter | None = None, watch: RequestWatch | None = None
    ) -> None:
        self._token = token.encode()
        self._limiter = limiter or CallLimiter()
        self._watch = watch or RequestWatch()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """Return the real handler, or one that aborts the call."""
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if METHOD_POLICY.get(handler_call_details.method) != "task-token":
            return _abort_handler(handler, grpc.StatusCode.PERMISSION_DENIED, "method not allowed")
        presented = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == TOKEN_METADATA_KEY:
                presented = value.encode() if isinstance(value, str) else bytes(value)
                break
        if not hmac.compare_digest(presented, self._token):
            return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "invalid or missing token")
        refused = self._limiter.take()
        if refused is not None:
            return _abort_handler(handler, grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
        return _guarded(handler, self._limiter, self._watch, handler_call_details.method)


def _rpc_errors(method: _F) -> _F:
    """Map session errors to gRPC statuses; hide anything unexpected."""

    @functools.wraps(method)
    def wrapper(self: SandboxServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except RequestRejected as exc:
            code = _STATUS_CATALOG.get(exc.code, grpc.StatusCode.INTERNAL)
            context.abort(
                code, exc.public_message if code is not grpc.StatusCode.INTERNAL else "internal error"
            )
        except grpc.RpcError:
            # Reading the request stream failed: the client cancelled, or the
            # call was cancelled for want of a request. Not an error of ours;
            # grpc ends the call quietly when its own error is re-raised.
            log.debug("%s of task %s was cancelled", method.__name__, self._session.task_id)
            raise
        except Exception:
            if not context.is_active():
                log.debug(
                    "%s of task %s ended while its call was gone", method.__name__, self._session.task_id
                )
                context.abort(grpc.StatusCode.CANCELLED, "cancelled")
            log.exception("unexpected error in %s for task %s", method.__name__, self._session.task_id)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper  # type: ignore[return-value]


def _enum_name(enum: Any, value: int) -> str:
    """The name of ``value`` in a protobuf enum, or ``"<invalid>"``."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return "<invalid>"


class SandboxServicer(pb_grpc.SandboxServicer):
    """Thin protobuf-to-session adapter for one task."""

    def __init__(self, session: TaskSession, limiter: CallLimiter | None = None) -> None:
        self._session = session
        self._limiter = limiter or CallLimiter()

    @_rpc_errors
    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.TaskConfig:
        """The task's configuration."""
        config = pb.TaskConfig()
        config.ParseFromString(self._session.get_config())
        return config

    def Heartbeat(
        self, request_iterator: Iterator[pb.Beat], context: grpc.ServicerContext
    ) -> Iterator[pb.Control]:
        """Record beats; stream control messages down."""
        session = self._session

        def read_beats() -> None:
            try:
                for beat in request_iterator:
                    session.record_beat(beat.progress_events, beat.mailbox_ops, beat.main_thread_moved)
            except Exception:  # the stream broke; the supervisor sees the silence
                log.debug("heartbeat stream of task %s ended abruptly", session.task_id)
            finally:
                session.controls.put(None)

        reader = threading.Thread(target=read_beats, name=f"beats-{session.task_id}", daemon=True)
        reader.start()
        while context.is_active():
            try:
                item = session.controls.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is None:
                break
            kind, reason = item
            yield pb.Control(kind=kind, reason=reason)

    @_rpc_errors
    def SendMessage(
        self, request_iterator: Iterator[pb.MessageChunk], context: grpc.ServicerContext
    ) -> pb.SendMessageResponse:
        """Forward a (chunked) message to the modeller."""
        first = next(request_iterator, None)
        if first is None:
            raise RequestRejected("INVALID_ARGUMENT", "empty message stream")
        message_type = _enum_name(pb.MessageType, first.type)

        def chunks() -> Iterator[bytes]:
            yield first.data
            for chunk in request_iterator:
                if len(chunk.data) > CHUNK_BYTES:
                    raise RequestRejected("INVALID_ARGUMENT", f"chunks may be at most {CHUNK_BYTES} bytes")
                if not chunk.data:  # costs the parent a message and moves nothing
                    raise RequestRejected("INVALID_ARGUMENT", "only the first chunk may be empty")
                yield chunk.data

        self._session.send_message(message_type, first.total_size, chunks())
        return pb.SendMessageResponse()

    @_rpc_errors
    def ReceiveMessage(
        self, request: pb.ReceiveMessageRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.MessageChunk]:
        """Wait for a message from the modeller; stream it down in chunks."""
        name = _enum_name(pb.MessageType, request.type)
        incoming = self._session.receive_message(name, request.timeout_ms / 1000)
        return _stream_incoming(incoming, request.type, context, self._session.task_id)

    @_rpc_errors
    def SendSecureShares(self, request: pb.SecureShares, context: grpc.ServicerContext) -> pb.Ack:
        """Send secure-aggregation shares to peer pods."""
        self._session.send_secure_shares(dict(request.shares))
        return pb.Ack()

    @_rpc_errors
    def GetSecureShares(
        self, request: pb.GetSecureSharesRequest, context: grpc.ServicerContext
    ) -> pb.SecureShares:
        """Wait for a share from every peer pod."""
        return pb.SecureShares(shares=self._session.get_secure_shares(request.timeout_ms / 1000))

    @_rpc_errors
    def ReportProgress(self, request: pb.ProgressEvent, context: grpc.ServicerContext) -> pb.Ack:
        """Pass a progress event on."""
        self._session.report_progress(
            ProgressUpdate(
                kind=_enum_name(pb.ProgressEvent.Kind, request.kind),
                current_epoch=request.current_epoch,
                max_epochs=request.max_epochs,
                current=request.current,
                total=request.total,
                info=request.info,
            )
        )
        return pb.Ack()

    @_rpc_errors
    def ReportFiles(self, request: pb.FileOutcomes, context: grpc.ServicerContext) -> pb.Ack:
        """Record per-file outcomes."""
        refused = self._limiter.charge(len(request.files) // FILES_PER_TOKEN)
        if refused is not None:
            raise RequestRejected("RESOURCE_EXHAUSTED", refused)
        self._session.report_files(
            [(f.name, _enum_name(pb.FileOutcome.Kind, f.kind), f.reason) for f in request.files]
        )
        return pb.Ack()

    @_rpc_errors
    def Finish(self, request: pb.FinishRequest, context: grpc.ServicerContext) -> pb.Ack:
        """Record the terminal result."""
        self._session.report_finish(
            status=_enum_name(pb.Status, request.status),
            result_json=request.result_json,
            error_type=request.error.type,
            error_message=request.error.message,
            traceback=request.error.traceback,
            timings=dict(request.timings),
        )
        return pb.Ack()


def _stream_incoming(
    incoming: Incoming, type_value: int, context: grpc.ServicerContext, task_id: str
) -> Iterator[pb.MessageChunk]:
    """Chunks of a received body; the first names type and size. Cleans up after."""
    try:
        first = True
        for data in incoming.chunks(CHUNK_BYTES):
            if first:
                yield pb.MessageChunk(type=type_value, total_size=incoming.size, data=data)  # type: ignore[arg-type]
                first = False
            else:
                yield pb.MessageChunk(data=data)
        if first:
            yield pb.MessageChunk(type=type_value, total_size=0)  # type: ignore[arg-type]
    except Exception:
        log.exception("streaming a message to task %s failed", task_id)
        context.abort(grpc.StatusCode.INTERNAL, "internal error")
    finally:
        incoming.discard()


class TaskServer:
    """A gRPC server for one task, listening on that task's Unix socket.

    Args:
        session: The task's state.
        token: The task's bootstrap token.
        socket_path: Where to listen.
        rate_per_s: The task's sustained call rate (tests set a low one).
        burst: How many calls the task may make at once.
    """

    def __init__(
        self,
        session: TaskSession,
        token: str,
        socket_path: Path,
        *,
        rate_per_s: float = RATE_PER_S,
        burst: int = RATE_BURST,
    ) -> None:
        self.session = session
        self.socket_path = socket_path
        # Mailbox bodies arrive in chunks; the result is the largest single message.
        cap = max(CHUNK_BYTES, session.max_result_bytes) + ENVELOPE_HEADROOM
        self._limiter = CallLimiter(rate_per_s, burst, on_abuse=self._end_for_abuse)
        self._watch = RequestWatch()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=SERVER_THREADS, thread_name_prefix=f"rpc-{session.task_id[:8]}"
            ),
            interceptors=[TokenAuthInterceptor(token, self._limiter, self._watch)],
            options=[
                ("grpc.max_receive_message_length", cap),
                ("grpc.max_send_message_length", -1),
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
                ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
                ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
                ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        pb_grpc.add_SandboxServicer_to_server(SandboxServicer(session, self._limiter), self._server)
        try:
            port = self._server.add_insecure_port(f"unix:{socket_path}")
        except RuntimeError:  # how grpc says the bind failed (e.g. a path too long for a socket)
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {socket_path}")

    def start(self) -> None:
        """Start serving."""
        self._server.start()

    def _end_for_abuse(self, reason: str) -> None:
        """End the task and close every connection of it: it abused the parent."""
        if self.session.end_for_abuse(ABUSE_ERROR_TYPE, reason):
            log.warning("task %s: %s; closing its connections", self.session.task_id, reason)
        self._server.stop(0)

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving, ending open streams, and remove the socket."""
        self.session.closed.set()
        self.session.controls.put(None)
        self._watch.stop()
        self._server.stop(grace).wait(grace + 1)
        self.socket_path.unlink(missing_ok=True)
