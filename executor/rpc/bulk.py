"""The bulk path: large mailbox bodies as raw bytes over a task's second Unix socket.

A body pushed through gRPC is cut into protobuf chunks, framed, parsed and
copied several times on each side. Above :data:`BULK_MIN_BYTES`, the runtime
instead asks for a single-use *ticket* over gRPC (``OpenBulkSend``, or in the
answer to ``ReceiveMessage``), connects to ``bulk.sock`` in its IPC directory
and presents its task token and the ticket; the body's bytes then flow with
no framing at all:

- **up** (a send): the sandbox writes exactly the announced size; the parent
  seals it as it arrives (the broker, as for a gRPC send) and answers one
  status line: ``OK`` or ``<gRPC code name> <message>``;
- **down** (a receive): the parent writes the body, opened one authenticated
  segment at a time, and closes. A segment that fails authentication ends
  the connection early: the sandbox sees a short body and discards it, so
  nothing unauthenticated is ever passed on.

Nothing here is interpreted: the bytes up are an opaque body the broker seals
and forwards, the header is a fixed layout checked byte for byte. A ticket
names one body of a size fixed when it was issued, is consumed by the first
connection that presents it and expires after :data:`TICKET_TTL_S`. At most
:data:`MAX_CONNECTIONS` connections are served at once (more are closed at
once), each must present its header within :data:`HEADER_TIMEOUT_S`, and any
pause longer than :data:`IDLE_TIMEOUT_S` ends it.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from executor.errors import DecryptionError
from executor.rpc.session import RequestRejected
from executor.sandbox.contract import (
    BULK_MAGIC,
    BULK_STATUS_MAX_BYTES,
    BULK_TICKET_BYTES,
    CHUNK_BYTES,
    MAX_BULK_CONNECTIONS,
    MAX_BULK_TICKETS,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from executor.mailbox.broker import Incoming

log = logging.getLogger(__name__)

MAX_CONNECTIONS = MAX_BULK_CONNECTIONS
"""Bulk connections served at once per task; more are closed as they come."""
MAX_TICKETS = MAX_BULK_TICKETS
"""Tickets one task may hold unused at once."""
BACKLOG = MAX_TICKETS
"""Connections the listener queues before a connect fails (Linux queues one more)."""
TICKET_TTL_S = 30.0
HEADER_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 60.0
_JOIN_S = 2.0


@dataclass
class _Ticket:
    size: int
    expires: float
    incoming: Incoming | None = None
    send: Callable[[Iterator[bytes]], None] | None = None
    used: bool = field(default=False)


class BulkServer:
    """Listens on a task's bulk socket and serves the tickets its gRPC server hands out.

    Args:
        path: Where to listen (the task's IPC directory).
        token: The task's bootstrap token; a connection must present it.
        name: The task (or warm slot) it serves, for the log.
    """

    def __init__(self, path: Path, token: str, name: str) -> None:
        self.path = path
        self._token = token.encode()
        self.name = name
        self._tickets: dict[bytes, _Ticket] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(path))
            # Room for every connection the sandbox can have waiting while the
            # acceptor lags: each presents its own unused ticket, so at most
            # MAX_TICKETS. Past the backlog a connect fails at once with EAGAIN
            # (the runtime then retries it; see executor/sandbox/context.py).
            self._listener.listen(BACKLOG)
        except OSError:
            self._listener.close()
            raise
        self._acceptor = threading.Thread(target=self._accept, name=f"bulk-{name[:8]}", daemon=True)

    def start(self) -> None:
        """Start accepting connections."""
        self._acceptor.start()

    # -- tickets (from the gRPC handlers) ---------------------------------------
    def offer_receive(self, incoming: Incoming) -> bytes | None:
        """A ticket for the sandbox to fetch ``incoming`` with; ``None`` if it holds too many.

        The ticket owns ``incoming`` from now on (discarded once served or expired).
        """
        return self._offer(_Ticket(incoming.size, time.monotonic() + TICKET_TTL_S, incoming=incoming))

    def offer_send(self, size: int, send: Callable[[Iterator[bytes]], None]) -> bytes | None:
        """A ticket for the sandbox to send a ``size``-byte body with; ``send`` takes its chunks."""
        return self._offer(_Ticket(size, time.monotonic() + TICKET_TTL_S, send=send))

    def _offer(self, ticket: _Ticket) -> bytes | None:
        key = secrets.token_bytes(BULK_TICKET_BYTES)
        expired = self._expire()
        try:
            with self._lock:
                if self._closed.is_set() or len(self._tickets) >= MAX_TICKETS:
                    return None
                self._tickets[key] = ticket
            return key
        finally:
            _discard(expired)

    def _expire(self) -> list[_Ticket]:
        now = time.monotonic()
        with self._lock:
            gone = [k for k, t in self._tickets.items() if t.expires <= now]
            return [self._tickets.pop(k) for k in gone]

    def _take(self, key: bytes) -> _Ticket | None:
        with self._lock:
            ticket = self._tickets.pop(key, None)
        if ticket is not None and ticket.expires <= time.monotonic():
            _discard([ticket])
            return None
        return ticket

    # -- connections -------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError as exc:
                if not self._closed.is_set() and exc.errno not in (errno.EINTR, errno.ECONNABORTED):
                    log.warning("task %s: bulk socket: accept failed: %s", self.name, exc)
                    time.sleep(0.05)
                continue
            with self._lock:
                if self._closed.is_set() or len(self._conns) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._conns.add(conn)
                thread = threading.Thread(
                    target=self._serve, args=(conn,), name=f"bulk-{self.name[:8]}", daemon=True
                )
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        ticket: _Ticket | None = None
        try:
            ticket = self._read_header(conn)
            if ticket is None:
                return
            conn.settimeout(IDLE_TIMEOUT_S)
            if ticket.incoming is not None:
                self._send_down(conn, ticket.incoming)
            elif ticket.send is not None:
                self._take_up(conn, ticket)
        except OSError as exc:  # the sandbox went away or stalled: its transfer fails, nothing else
            log.info("task %s: bulk transfer ended: %s", self.name, exc)
        except Exception:
            log.exception("task %s: bulk transfer failed", self.name)
        finally:
            self._release(conn)
            with contextlib.suppress(OSError):
                conn.close()
            if ticket is not None:
                _discard([ticket])
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _release(self, conn: socket.socket) -> None:
        """Stop counting ``conn`` against :data:`MAX_CONNECTIONS`; safe twice.

        Called before the sandbox can see its transfer end (the status, the
        end-of-file, the close), and nothing that waits on the sandbox follows
        it: a sandbox that opens its next transfer the moment one ends must
        find the slot free, not lose the race to this thread's clean-up (a
        spool file to delete, a busy host's scheduling).
        """
        with self._lock:
            self._conns.discard(conn)

    def _read_header(self, conn: socket.socket) -> _Ticket | None:
        """The ticket a well-formed header with the right token names, else ``None`` (connection refused).

        The whole header must arrive within :data:`HEADER_TIMEOUT_S`, in as many pieces as it likes.
        """
        deadline = time.monotonic() + HEADER_TIMEOUT_S
        head = _recv_exactly(conn, len(BULK_MAGIC) + 1, deadline)
        if head is None or head[:-1] != BULK_MAGIC:
            return None
        rest = _recv_exactly(conn, head[-1] + BULK_TICKET_BYTES, deadline)
        if rest is None:
            return None
        token, key = rest[: head[-1]], rest[head[-1] :]
        if not hmac.compare_digest(token, self._token):
            log.warning("task %s: bulk connection with a wrong token refused", self.name)
            return None
        return self._take(key)

    def _send_down(self, conn: socket.socket, incoming: Incoming) -> None:
        try:
            for data in incoming.chunks(CHUNK_BYTES):
                conn.sendall(data)
        except DecryptionError as exc:
            # What went down was authentic; the sandbox sees a short body and drops it.
            log.error("task %s: %s", self.name, exc)
            return
        self._release(conn)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)

    def _take_up(self, conn: socket.socket, ticket: _Ticket) -> None:
        assert ticket.send is not None
        size = ticket.size

        def chunks() -> Iterator[bytes]:
            left = size
            while left:
                data = conn.recv(min(CHUNK_BYTES, left), socket.MSG_WAITALL)
                if not data:
                    raise RequestRejected(
                        "INVALID_ARGUMENT", f"the body ended {left} bytes short of its size"
                    )
                left -= len(data)
                yield data

        try:
            ticket.send(chunks())
            status = b"OK"
        except RequestRejected as exc:
            status = f"{exc.code} {exc.public_message}".encode()[:BULK_STATUS_MAX_BYTES]
        except OSError:
            raise
        except Exception:
            log.exception("task %s: bulk send failed", self.name)
            status = b"INTERNAL internal error"
        # At most BULK_STATUS_MAX_BYTES into a send buffer nothing else used: it cannot block.
        self._release(conn)
        conn.sendall(status)
        with contextlib.suppress(OSError):
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        """Stop listening, end every transfer, drop unused tickets, remove the socket. Safe twice."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            conns = list(self._conns)
            threads = list(self._threads)
            tickets = list(self._tickets.values())
            self._tickets.clear()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._acceptor.is_alive() and self._acceptor is not threading.current_thread():
            self._acceptor.join(_JOIN_S)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(_JOIN_S)
        _discard(tickets)
        self.path.unlink(missing_ok=True)


def _recv_exactly(conn: socket.socket, n: int, deadline: float) -> bytes | None:
    """``n`` bytes, however they are split, by ``deadline`` (``time.monotonic()``); ``None`` if not.

    A socket with a timeout is non-blocking underneath, so ``MSG_WAITALL``
    alone would return whatever has arrived: the loop waits for the rest.
    """
    parts: list[bytes] = []
    got = 0
    while got < n:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        conn.settimeout(left)
        try:
            data = conn.recv(n - got)
        except TimeoutError:
            return None
        if not data:
            return None
        parts.append(data)
        got += len(data)
    return b"".join(parts)


def _discard(tickets: list[_Ticket]) -> None:
    for ticket in tickets:
        if ticket.incoming is not None:
            ticket.incoming.discard()
