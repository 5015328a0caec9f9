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
# A connection that carries no call for this long is closed (the runtime's
# heartbeat stream keeps its own connection busy).
IDLE_CONNECTION_MS = 60_000
# Connections one task may hold open: the runtime needs one. Without a cap a
# protocol could exhaust the parent's file descriptors, which all tasks share.
MAX_CONNECTIONS = 8
HANDSHAKE_TIMEOUT_MS = 5_000
# Mailbox bodies of any size travel in chunks of at most this many bytes, so no
# single gRPC message is ever large.
CHUNK_BYTES = 1024 * 1024
ENVELOPE_HEADROOM = 64 * 1024
SERVER_THREADS = 8
MAX_CONCURRENT_RPCS = 12

_F = TypeVar("_F", bound=Callable[..., Any])


def _abort_handler(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same streaming shape as ``handler`` that only aborts."""

    def deny(request: Any, context: grpc.ServicerContext) -> Any:
        context.abort(code, message)

    # No deserializer: a refused call's request is never parsed.
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny)
    return grpc.unary_unary_rpc_method_handler(deny)


class CallLimiter:
    """A token bucket for the call rate and counters for open calls, for one task."""

    def __init__(self, rate_per_s: float = RATE_PER_S, burst: int = RATE_BURST) -> None:
        self._rate = rate_per_s
        self._burst = float(burst)
        self._tokens = float(burst)
        self._stamp = time.monotonic()
        self._open: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, method: str) -> str | None:
        """Take a slot for a call to ``method``; the reason it is refused, or ``None``."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
            self._stamp = now
            if self._tokens < 1:
                return "call rate limit exceeded"
            cap = CONCURRENCY.get(method)
            if cap is not None and self._open.get(method, 0) >= cap:
                return f"at most {cap} {method.rsplit('/', 1)[-1]} call(s) may be open at once"
            self._tokens -= 1
            self._open[method] = self._open.get(method, 0) + 1
            return None

    def release(self, method: str) -> None:
        """Give back the slot of a finished call."""
        with self._lock:
            self._open[method] -= 1


def _guarded(
    handler: grpc.RpcMethodHandler[Any, Any], limiter: CallLimiter, method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler``, parsing its own requests and holding a limiter slot while it runs.

    Requests reach the handler as raw bytes and are parsed here, so a
    malformed one is refused with INVALID_ARGUMENT by our own code (grpc's
    failed-deserialisation path leaves streams behind on the connection), and
    the slot is taken only once the handler really runs, so a call grpc
    refuses earlier (too large, over the server's concurrency cap) cannot
    leak one.
    """
    parse: Callable[[bytes], Any] = handler.request_deserializer or (lambda raw: raw)
    kwargs: dict[str, Any] = {
        "request_deserializer": None,
        "response_serializer": handler.response_serializer,
    }

    def parsed(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:
            raise RequestRejected("INVALID_ARGUMENT", "malformed request") from None

    def parsed_stream(raws: Iterator[bytes]) -> Iterator[Any]:
        for raw in raws:
            yield parsed(raw)

    def enter(context: grpc.ServicerContext) -> None:
        refused = limiter.admit(method)
        if refused is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)

    def first(raw: Any, context: grpc.ServicerContext, streaming: bool) -> Any:
        if streaming:
            return parsed_stream(raw)
        try:
            return parsed(raw)
        except RequestRejected as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.public_message)

    if not handler.response_streaming:
        behaviour = handler.unary_unary or handler.stream_unary
        assert behaviour is not None

        def once(raw: Any, context: grpc.ServicerContext) -> Any:
            enter(context)
            try:
                return behaviour(first(raw, context, handler.request_streaming), context)
            finally:
                limiter.release(method)

        factory = (
            grpc.stream_unary_rpc_method_handler
            if handler.request_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        return factory(once, **kwargs)
    streaming = handler.unary_stream or handler.stream_stream
    assert streaming is not None

    def stream(raw: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        enter(context)
        try:
            yield from streaming(first(raw, context, handler.request_streaming), context)
        finally:
            limiter.release(method)

    factory = (
        grpc.stream_stream_rpc_method_handler
        if handler.request_streaming
        else grpc.unary_stream_rpc_method_handler
    )
    return factory(stream, **kwargs)


class TokenAuthInterceptor(grpc.ServerInterceptor):
    """Admit a call only if its method is mapped, it carries this task's token, and limits allow."""

    def __init__(self, token: str, limiter: CallLimiter | None = None) -> None:
        self._token = token.encode()
        self._limiter = limiter or CallLimiter()

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
        return _guarded(handler, self._limiter, handler_call_details.method)


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
        except Exception:
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

    def __init__(self, session: TaskSession) -> None:
        self._session = session

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
    """

    def __init__(self, session: TaskSession, token: str, socket_path: Path) -> None:
        self.session = session
        self.socket_path = socket_path
        # Mailbox bodies arrive in chunks; the result is the largest single message.
        cap = max(CHUNK_BYTES, session.max_result_bytes) + ENVELOPE_HEADROOM
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=SERVER_THREADS, thread_name_prefix=f"rpc-{session.task_id[:8]}"
            ),
            interceptors=[TokenAuthInterceptor(token)],
            options=[
                ("grpc.max_receive_message_length", cap),
                ("grpc.max_send_message_length", -1),
                ("grpc.max_metadata_size", MAX_METADATA_BYTES),
                ("grpc.max_concurrent_streams", MAX_CONCURRENT_RPCS),
                ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
                ("grpc.max_allowed_incoming_connections", MAX_CONNECTIONS),
                ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
                ("grpc.so_reuseport", 0),
            ],
            maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        )
        pb_grpc.add_SandboxServicer_to_server(SandboxServicer(session), self._server)
        if self._server.add_insecure_port(f"unix:{socket_path}") == 0:
            raise OSError(f"cannot listen on {socket_path}")

    def start(self) -> None:
        """Start serving."""
        self._server.start()

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving, ending open streams, and remove the socket."""
        self.session.closed.set()
        self.session.controls.put(None)
        self._server.stop(grace).wait(grace + 1)
        self.socket_path.unlink(missing_ok=True)
