"""The servicer: protobuf in, through :mod:`executor.rpc.serde` to the task's session, protobuf out.

Errors map to a status and a public message in one catalog; anything unexpected
becomes INTERNAL with no detail.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from executor.errors import DecryptionError
from executor.rpc import serde
from executor.rpc.limits import CallLimiter, refusal
from executor.rpc.session import RequestRejected, SessionRef, TaskSession
from executor.sandbox.contract import BULK_BUSY_TRAILER, CHUNK_BYTES
from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from executor.mailbox.broker import Incoming
    from executor.rpc.bulk import BulkServer

log = logging.getLogger(__name__)

# RequestRejected codes a handler may return, and nothing else.
_STATUS_CATALOG: dict[str, grpc.StatusCode] = {
    "INVALID_ARGUMENT": grpc.StatusCode.INVALID_ARGUMENT,
    "RESOURCE_EXHAUSTED": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "DEADLINE_EXCEEDED": grpc.StatusCode.DEADLINE_EXCEEDED,
    "FAILED_PRECONDITION": grpc.StatusCode.FAILED_PRECONDITION,
    "DATA_LOSS": grpc.StatusCode.DATA_LOSS,
    "UNAVAILABLE": grpc.StatusCode.UNAVAILABLE,
}

_F = TypeVar("_F", bound=Callable[..., Any])


def _rpc_errors(method: _F) -> _F:
    """Map session errors to gRPC statuses; hide anything unexpected."""

    @functools.wraps(method)
    def wrapper(self: SandboxServicer, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except RequestRejected as exc:
            code = _STATUS_CATALOG.get(exc.code, grpc.StatusCode.INTERNAL)
            if exc.trailers and code is not grpc.StatusCode.INTERNAL:
                context.set_trailing_metadata(exc.trailers)
            context.abort(
                code, exc.public_message if code is not grpc.StatusCode.INTERNAL else "internal error"
            )
        except grpc.RpcError:
            # Reading the request stream failed: the client cancelled, or the
            # call was cancelled for want of a request. Not an error of ours;
            # grpc ends the call quietly when its own error is re-raised.
            log.debug("%s of task %s was cancelled", method.__name__, self._ref.name)
            raise
        except Exception:
            if not context.is_active():
                log.debug("%s of task %s ended while its call was gone", method.__name__, self._ref.name)
                context.abort(grpc.StatusCode.CANCELLED, "cancelled")
            log.exception("unexpected error in %s for task %s", method.__name__, self._ref.name)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")

    return wrapper  # type: ignore[return-value]


class SandboxServicer(pb_grpc.SandboxServicer):
    """Thin protobuf-to-session adapter for one task.

    A warm slot's servicer starts without a task (an unbound
    :class:`~executor.rpc.session.SessionRef`): ``GetTask`` then waits until
    the slot is given one, and every other call is refused until then.
    """

    def __init__(
        self,
        session: TaskSession | SessionRef,
        limiter: CallLimiter | None = None,
        *,
        bulk: BulkServer | None = None,
    ) -> None:
        self._ref = session if isinstance(session, SessionRef) else SessionRef(session)
        self._limiter = limiter or CallLimiter()
        self._bulk = bulk

    @property
    def _session(self) -> TaskSession:
        """The task's session; a call before the slot has a task is refused."""
        session = self._ref.session
        if session is None:
            raise RequestRejected("FAILED_PRECONDITION", "no task yet: call GetTask first")
        return session

    @_rpc_errors
    def GetTask(self, request: pb.GetTaskRequest, context: grpc.ServicerContext) -> pb.TaskConfig:
        """The task's configuration (a warm slot's, once it is given a task)."""
        if request.no_wait:
            return self._session.get_config()
        session = self._ref.wait(context.is_active)
        if session is None:
            raise RequestRejected("UNAVAILABLE", "the sandbox is being shut down")
        return session.get_config()

    def Heartbeat(
        self, request_iterator: Iterator[pb.Beat], context: grpc.ServicerContext
    ) -> Iterator[pb.Control]:
        """Record beats; stream control messages down.

        A warm slot's sandbox opens the stream while it waits for its task:
        its beats are read from the moment the slot is given one.
        """
        session = self._ref.wait(context.is_active)
        if session is None:
            context.abort(grpc.StatusCode.UNAVAILABLE, "the sandbox is being shut down")
            return

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
            yield serde.control_message(item)

    @_rpc_errors
    def SendMessage(
        self, request_iterator: Iterator[pb.MessageChunk], context: grpc.ServicerContext
    ) -> pb.SendMessageResponse:
        """Forward a (chunked) message to the modeller."""
        first = next(request_iterator, None)
        if first is None:
            raise RequestRejected("INVALID_ARGUMENT", "empty message stream")
        message_type = serde.message_type(first.type)

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
        name = serde.message_type(request.type)
        incoming = self._session.receive_message(name, request.timeout_ms / 1000)
        if self._bulk is not None and request.bulk_min_bytes and incoming.size >= request.bulk_min_bytes:
            ticket = self._bulk.offer_receive(incoming)
            if ticket is not None:  # else too many unused tickets: it streams as chunks
                return iter(
                    [pb.MessageChunk(type=request.type, total_size=incoming.size, bulk_ticket=ticket)]
                )
        return _stream_incoming(incoming, request.type, context, self._session.task_id)

    def Mailbox(
        self, request_iterator: Iterator[pb.MailboxOp], context: grpc.ServicerContext
    ) -> Iterator[pb.MailboxReply]:
        """Mailbox operations on one stream, one at a time, each answered before the next is read.

        Every operation is charged like a call (see :func:`~executor.rpc.limits.guarded`)
        and checked exactly as :meth:`SendMessage` and :meth:`ReceiveMessage` check theirs.
        """
        try:
            for op in request_iterator:
                try:
                    yield from self._mailbox_op(op, context)
                except RequestRejected as exc:
                    code = exc.code if exc.code in _STATUS_CATALOG else "INTERNAL"
                    yield pb.MailboxReply(error_code=code, error_message=exc.public_message)
        except RequestRejected as exc:  # reading the next operation was refused (rate, malformed)
            status = _STATUS_CATALOG.get(exc.code, grpc.StatusCode.INTERNAL)
            if exc.trailers:
                context.set_trailing_metadata(exc.trailers)
            context.abort(status, exc.public_message)
        except grpc.RpcError:
            log.debug("the mailbox stream of task %s was cancelled", self._ref.name)
            raise
        except Exception:
            if context.is_active():
                log.exception("unexpected error in the mailbox stream of task %s", self._ref.name)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")

    def _mailbox_op(self, op: pb.MailboxOp, context: grpc.ServicerContext) -> Iterator[pb.MailboxReply]:
        session = self._session
        has_send, has_receive = op.HasField("send"), op.HasField("receive")
        if has_send == has_receive:
            raise RequestRejected("INVALID_ARGUMENT", "an operation must either send or receive")
        if has_send:
            chunk = op.send
            if len(chunk.data) > CHUNK_BYTES or chunk.total_size != len(chunk.data):
                raise RequestRejected(
                    "INVALID_ARGUMENT",
                    f"a send on the stream carries its whole body, at most {CHUNK_BYTES} bytes",
                )
            session.send_message(serde.message_type(chunk.type), chunk.total_size, iter([chunk.data]))
            yield pb.MailboxReply()
            return
        request = op.receive
        incoming = session.receive_message(serde.message_type(request.type), request.timeout_ms / 1000)
        if self._bulk is not None and request.bulk_min_bytes and incoming.size >= request.bulk_min_bytes:
            ticket = self._bulk.offer_receive(incoming)
            if ticket is not None:  # the ticket owns the body now
                yield pb.MailboxReply(
                    chunk=pb.MessageChunk(type=request.type, total_size=incoming.size, bulk_ticket=ticket)
                )
                return
        yield from _replies(incoming, request.type, session.task_id)

    @_rpc_errors
    def OpenBulkSend(self, request: pb.BulkSendRequest, context: grpc.ServicerContext) -> pb.BulkTicket:
        """A ticket to send one body of the given type and size over the bulk socket."""
        session = self._session
        message_type = serde.message_type(request.type)
        session.check_send(message_type, request.total_size)
        if self._bulk is None:
            raise RequestRejected("FAILED_PRECONDITION", "this task has no bulk socket")
        # A body's bytes cost what its chunks would over gRPC.
        refused = self._limiter.charge(request.total_size // CHUNK_BYTES)
        if refused is not None:
            raise refusal(refused)
        size = request.total_size
        ticket = self._bulk.offer_send(size, lambda chunks: session.send_message(message_type, size, chunks))
        if ticket is None:
            raise RequestRejected(
                "RESOURCE_EXHAUSTED",
                "too many bulk transfers are open at once",
                trailers=((BULK_BUSY_TRAILER, "1"),),
            )
        return pb.BulkTicket(ticket=ticket)

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
    def Report(self, request: pb.ReportRequest, context: grpc.ServicerContext) -> pb.Ack:
        """A report of any kind: charged by its case before it is converted, then checked by the session."""
        case, items = serde.report_case(request)
        refused = self._limiter.report(case, items)
        if refused is not None:
            raise refusal(refused)
        self._session.take_report(*serde.report(request))
        return pb.Ack()

    @_rpc_errors
    def Finish(self, request: pb.FinishRequest, context: grpc.ServicerContext) -> pb.Ack:
        """Record the terminal result."""
        self._session.report_finish(**serde.finish_fields(request))
        return pb.Ack()


def _replies(incoming: Incoming, type_value: int, task_id: str) -> Iterator[pb.MailboxReply]:
    """A received body as mailbox-stream replies; one failing authentication part-way ends in an error."""
    try:
        pending: pb.MailboxReply | None = None
        for data in incoming.chunks(CHUNK_BYTES):
            if pending is None:
                chunk = pb.MessageChunk(type=type_value, total_size=incoming.size, data=data)  # type: ignore[arg-type]
            else:
                pending.more = True
                yield pending
                chunk = pb.MessageChunk(data=data)
            pending = pb.MailboxReply(chunk=chunk)
        yield pending or pb.MailboxReply(chunk=pb.MessageChunk(type=type_value, total_size=0))  # type: ignore[arg-type]
    except DecryptionError as exc:
        # The sandbox drops what came before and sees the error instead of the rest.
        log.error("task %s: %s", task_id, exc)
        raise RequestRejected("DATA_LOSS", "a message from the modeller failed authentication") from None
    finally:
        incoming.discard()


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
    except DecryptionError as exc:
        # Part of the body may have gone down, each segment authentic; the
        # sandbox sees the call fail and never hands a partial body on.
        log.error("task %s: %s", task_id, exc)
        context.abort(grpc.StatusCode.DATA_LOSS, "a message from the modeller failed authentication")
    except Exception:
        log.exception("streaming a message to task %s failed", task_id)
        context.abort(grpc.StatusCode.INTERNAL, "internal error")
    finally:
        incoming.discard()
