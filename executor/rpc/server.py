"""A task's gRPC server on its own Unix socket, with the interceptor, the servicer and the caps."""

from __future__ import annotations

import errno
import logging
from concurrent import futures
from typing import TYPE_CHECKING

import grpc

from executor.rpc.auth import TokenAuthInterceptor
from executor.rpc.bulk import BulkServer
from executor.rpc.limits import (
    ABUSE_ERROR_TYPE,
    ENVELOPE_HEADROOM,
    HANDSHAKE_TIMEOUT_MS,
    IDLE_CONNECTION_MS,
    MAX_CONCURRENT_RPCS,
    MAX_CONNECTIONS,
    MAX_METADATA_BYTES,
    MAX_STREAMS_PER_CONNECTION,
    RATE_BURST,
    RATE_PER_S,
    SERVER_THREADS,
    CallLimiter,
    RequestWatch,
)
from executor.rpc.servicer import SandboxServicer
from executor.rpc.session import SessionRef, TaskSession
from executor.sandbox.contract import BULK_SOCKET_NAME, CHUNK_BYTES
from executor.v1 import sandbox_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)


class TaskServer:
    """A gRPC server for one task, listening on that task's Unix socket.

    Args:
        session: The task's state; a warm slot's server gets an unbound
            :class:`SessionRef` and is handed its task later.
        token: The task's bootstrap token.
        socket_path: Where to listen.
        rate_per_s: The task's sustained call rate (tests set a low one).
        burst: How many calls the task may make at once.
        max_result_bytes: The largest result the task may report; by default
            the session's (required for an unbound slot).
    """

    def __init__(
        self,
        session: TaskSession | SessionRef,
        token: str,
        socket_path: Path,
        *,
        rate_per_s: float = RATE_PER_S,
        burst: int = RATE_BURST,
        max_result_bytes: int | None = None,
    ) -> None:
        self.ref = session if isinstance(session, SessionRef) else SessionRef(session)
        self.socket_path = socket_path
        if max_result_bytes is None:
            bound = self.ref.session
            if bound is None:
                raise ValueError("an unbound slot's server needs max_result_bytes")
            max_result_bytes = bound.max_result_bytes
        # Mailbox bodies arrive in chunks; the result is the largest single message.
        cap = max(CHUNK_BYTES, max_result_bytes) + ENVELOPE_HEADROOM
        self._limiter = CallLimiter(rate_per_s, burst, on_abuse=self._end_for_abuse)
        self._watch = RequestWatch()
        self._server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=SERVER_THREADS, thread_name_prefix=f"rpc-{self.ref.name[:8]}"
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
        try:
            port = self._server.add_insecure_port(f"unix:{socket_path}")
        except RuntimeError:  # how grpc says the bind failed (e.g. a path too long for a socket)
            port = 0
        if port == 0:
            # strerror says why; the caller names the path (see runner._on_host).
            raise OSError(errno.EINVAL, "gRPC could not bind it (a path too long for a socket?)")
        # Large bodies travel raw beside it (see executor/rpc/bulk.py).
        self.bulk = BulkServer(socket_path.parent / BULK_SOCKET_NAME, token, self.ref.name)
        pb_grpc.add_SandboxServicer_to_server(
            SandboxServicer(self.ref, self._limiter, bulk=self.bulk), self._server
        )

    def start(self) -> None:
        """Start serving."""
        self.bulk.start()
        self._server.start()

    @property
    def session(self) -> TaskSession | None:
        """The task's session; ``None`` while a warm slot waits for its task."""
        return self.ref.session

    def _end_for_abuse(self, reason: str) -> None:
        """End the task and close every connection of it: it abused the parent."""
        # Every connection closed first: once the task reads as ended, none is left.
        self._server.stop(0)
        self.bulk.close()
        session = self.ref.session
        if session is None or session.end_for_abuse(ABUSE_ERROR_TYPE, reason):
            log.warning("task %s: %s; closing its connections", self.ref.name, reason)

    def stop(self, grace: float = 1.0) -> None:
        """Stop serving, ending open streams, and remove the socket."""
        self.ref.close()
        session = self.ref.session
        if session is not None:
            session.controls.put(None)
        self._watch.stop()
        self.bulk.close()
        self._server.stop(grace).wait(grace + 1)
        self.socket_path.unlink(missing_ok=True)
