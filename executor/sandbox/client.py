"""The sandbox's end of its channel: the authenticated stub, rate-limit retries, bulk connections."""

from __future__ import annotations

import socket
import threading
import time
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from executor.sandbox.contract import (
    BULK_MAGIC,
    MAX_BULK_CONNECTIONS,
    MAX_BULK_TICKETS,
    RATE_LIMITED_TRAILER,
    TOKEN_METADATA_KEY,
    ReportCase,
)
from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from collections.abc import Callable

_R = TypeVar("_R")

RPC_TIMEOUT_S = 30.0
RATE_RETRIES = 12
RATE_BACKOFF_S = 0.005
# Generous: a 256 MiB body at tens of MiB/s still fits.
BULK_TIMEOUT_S = 600.0
# While the bulk socket's backlog is full, the connect is retried this often (doubling up to the max).
CONNECT_RETRY_S = 0.002
CONNECT_RETRY_MAX_S = 0.05


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

    def report(self, case: ReportCase, message: Any) -> None:
        """Send one report (``message``, the case ``case`` of a Report call), backing off while too fast.

        Raises:
            grpc.RpcError: The parent refused it or could not be reached.
        """
        request = pb.ReportRequest(**{case.value: message})
        self.call(lambda: self.stub.Report(request, metadata=self.metadata, timeout=RPC_TIMEOUT_S))

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
