"""The bulk socket attacked as hostile sandbox code would: headers, tickets, caps, timeouts, close.

A :class:`BulkServer` on a real Unix socket with a fake send callable and
in-memory or spooled :class:`Incoming` bodies; then the same path through a
real :class:`TaskServer` (OpenBulkSend and the bulk branch of ReceiveMessage).
The timeouts are made short here so that nothing waits seconds.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from executor.mailbox.broker import Incoming
from executor.rpc import bulk as bulk_module
from executor.rpc.bulk import BulkServer
from executor.rpc.server import TaskServer
from executor.rpc.session import RequestRejected
from executor.sandbox.client import ParentClient
from executor.sandbox.context import Context
from executor.sandbox.contract import BULK_MAGIC, TOKEN_METADATA_KEY
from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc
from tests.unit.conftest import SessionKit, wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.timeout(30)

# The caps as pinned here, not as the code under test has them (tests/rpc_caps.py does so for gRPC).
MAX_CONNECTIONS = 4
MAX_TICKETS = 4
TOKEN = "t" * 43  # as long as a token_urlsafe(32)
MiB = 1024 * 1024
HEADER_TIMEOUT_S = 0.25
IDLE_TIMEOUT_S = 0.5
# "Closed at once": where a test checks it, the header timeout is made 2 s, far above this.
PROMPTLY_S = 0.5
SLOW_HEADER_S = 2.0
WAIT_S = 3.0


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short private directory: a pytest tmp_path can be too long for a socket's address."""
    path = Path(tempfile.mkdtemp(prefix="se-bulk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def server(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[BulkServer]:
    """A started BulkServer with short header and idle timeouts; closed afterwards."""
    monkeypatch.setattr(bulk_module, "HEADER_TIMEOUT_S", HEADER_TIMEOUT_S)
    monkeypatch.setattr(bulk_module, "IDLE_TIMEOUT_S", IDLE_TIMEOUT_S)
    srv = BulkServer(sock_dir / "bulk.sock", TOKEN, "task-1")
    try:  # closed even if it fails to start
        srv.start()
        yield srv
    finally:
        srv.close()


@dataclass
class Sends:
    """A fake send callable: records each body it read to the end."""

    bodies: list[bytes] = field(default_factory=list)
    error: Exception | None = None

    def __call__(self, chunks: Iterator[bytes]) -> None:
        body = b"".join(chunks)
        if self.error is not None:
            raise self.error
        self.bodies.append(body)


def header(ticket: bytes, token: str = TOKEN, magic: bytes = BULK_MAGIC) -> bytes:
    raw = token.encode()
    return magic + bytes([len(raw)]) + raw + ticket


def connect(srv: BulkServer, first: bytes = b"") -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    try:
        sock.connect(str(srv.path))
    except OSError:
        sock.close()
        raise
    if first:
        # It may be closed by the parent already: what it sends back says so.
        with contextlib.suppress(OSError):
            sock.sendall(first)
    return sock


def drain(sock: socket.socket, wait_s: float = WAIT_S) -> tuple[bytes, str, float]:
    """Everything ``sock`` gets until it ends: the bytes, how it ended, and after how long."""
    sock.settimeout(wait_s)
    started = time.monotonic()
    parts: list[bytes] = []
    how = "eof"
    try:
        while data := sock.recv(MiB):
            parts.append(data)
    except ConnectionResetError:
        how = "reset"
    except TimeoutError:
        how = "still open"
    finally:
        sock.close()
    return b"".join(parts), how, time.monotonic() - started


def ended(sock: socket.socket, wait_s: float = WAIT_S) -> bytes:
    """What ``sock`` got before the parent ended it (a close with unread bytes is a reset)."""
    data, how, _ = drain(sock, wait_s)
    assert how in ("eof", "reset"), f"the parent kept the connection open {wait_s} s"
    return data


def receive_ticket(srv: BulkServer, body: bytes = b"model weights") -> bytes:
    ticket = srv.offer_receive(Incoming("ALGORITHM_EXCHANGE", len(body), body=body))
    assert ticket is not None
    return ticket


# -- receive tickets -------------------------------------------------------------------------


def test_the_caps_are_their_pinned_values():
    assert (
        bulk_module.MAX_CONNECTIONS,
        bulk_module.MAX_TICKETS,
        bulk_module.TICKET_TTL_S,
        bulk_module.HEADER_TIMEOUT_S,
        bulk_module.IDLE_TIMEOUT_S,
    ) == (MAX_CONNECTIONS, MAX_TICKETS, 30.0, 5.0, 60.0)


def test_a_receive_ticket_delivers_exactly_the_body_once(server):
    body = secrets.token_bytes(3 * MiB + 17)  # more than one chunk
    ticket = receive_ticket(server, body)
    assert len(ticket) == 16
    got, how, _ = drain(connect(server, header(ticket)))
    assert (len(got), how) == (len(body), "eof")
    assert got == body
    # Single use: the same ticket again gets nothing and is closed.
    assert ended(connect(server, header(ticket))) == b""


@pytest.mark.parametrize(
    "make_header",
    [
        lambda ticket: header(secrets.token_bytes(16)),
        lambda ticket: header(bytes(16)),
        lambda ticket: header(ticket, token=TOKEN[:-1] + "u"),
        lambda ticket: header(ticket, token=TOKEN + "t"),
        lambda ticket: header(ticket, token=""),
        lambda ticket: header(ticket, magic=b"SE-BULK2"),
        lambda ticket: b"\x00" * len(header(ticket)),
        lambda ticket: header(ticket)[:-1],
        lambda ticket: BULK_MAGIC,
        lambda ticket: b"",
    ],
    ids=[
        "unknown-ticket",
        "zero-ticket",
        "wrong-token",
        "longer-token",
        "no-token",
        "wrong-magic",
        "zeros",
        "short-header",
        "magic-only",
        "nothing",
    ],
)
def test_a_bad_header_gets_nothing_and_leaves_the_ticket_usable(server, make_header, monkeypatch):
    monkeypatch.setattr(bulk_module, "HEADER_TIMEOUT_S", SLOW_HEADER_S)
    ticket = receive_ticket(server, b"secret body")
    sock = connect(server, make_header(ticket))
    sock.shutdown(socket.SHUT_WR)  # says no more: a short header cannot wait for the rest
    data, how, took = drain(sock)
    assert (data, how in ("eof", "reset")) == (b"", True)
    assert took < PROMPTLY_S
    # A refused header did not use the ticket up.
    assert ended(connect(server, header(ticket))) == b"secret body"


@pytest.mark.parametrize("sent", [b"", BULK_MAGIC + bytes([len(TOKEN)])], ids=["silent", "no-token-yet"])
def test_a_header_that_never_completes_is_closed_by_the_header_timeout(server, sent):
    ticket = receive_ticket(server)
    sock = connect(server, sent)
    data, how, took = drain(sock)
    assert (data, how) == (b"", "eof")
    assert took < HEADER_TIMEOUT_S + 1.0
    # Then the ticket still serves its body.
    assert ended(connect(server, header(ticket))) == b"model weights"


def test_a_header_written_in_pieces_within_the_timeout_is_accepted(server):
    ticket = receive_ticket(server)
    sock = connect(server, header(ticket)[:4])
    time.sleep(HEADER_TIMEOUT_S / 3)
    with contextlib.suppress(OSError):
        sock.sendall(header(ticket)[4:])
    assert drain(sock)[:2] == (b"model weights", "eof")


def test_an_expired_ticket_is_refused_and_its_spool_file_deleted(server, sock_dir, monkeypatch):
    monkeypatch.setattr(bulk_module, "TICKET_TTL_S", 0.05)
    spool = sock_dir / "spooled-body"
    spool.write_bytes(b"x" * 1000)
    ticket = server.offer_receive(Incoming("ALGORITHM_EXCHANGE", 1000, path=spool))
    assert ticket is not None
    time.sleep(0.1)
    assert ended(connect(server, header(ticket))) == b""
    assert not spool.exists()


def test_an_expired_ticket_frees_its_slot_and_its_spool_file(server, sock_dir, monkeypatch):
    monkeypatch.setattr(bulk_module, "TICKET_TTL_S", 0.05)
    spool = sock_dir / "spooled-body"
    spool.write_bytes(b"x" * 1000)
    ticket = server.offer_receive(Incoming("ALGORITHM_EXCHANGE", 1000, path=spool))
    for _ in range(MAX_TICKETS - 1):
        assert server.offer_send(10, Sends()) is not None
    time.sleep(0.1)
    # Every unused ticket expired: a new offer gets a slot, and the spooled body is gone.
    assert server.offer_send(10, Sends()) is not None
    assert not spool.exists()
    assert ended(connect(server, header(ticket))) == b""


# -- send tickets ---------------------------------------------------------------------------


def test_a_send_ticket_passes_exactly_the_announced_bytes_and_answers_ok(server):
    sends = Sends()
    body = secrets.token_bytes(2 * MiB + 5)
    ticket = server.offer_send(len(body), sends)
    assert ticket is not None
    sock = connect(server, header(ticket) + body)
    sock.shutdown(socket.SHUT_WR)
    assert drain(sock)[:2] == (b"OK", "eof")
    assert sends.bodies == [body]
    # Single use.
    assert ended(connect(server, header(ticket) + body)) == b""
    assert sends.bodies == [body]


def test_a_body_that_ends_short_is_not_sent_and_says_why(server):
    sends = Sends()
    ticket = server.offer_send(1000, sends)
    assert ticket is not None
    sock = connect(server, header(ticket) + b"a" * 600)
    sock.shutdown(socket.SHUT_WR)
    status = ended(sock)
    assert status == b"INVALID_ARGUMENT the body ended 400 bytes short of its size"
    assert sends.bodies == []


def test_a_body_that_stops_mid_way_ends_by_the_idle_timeout(server):
    sends = Sends()
    ticket = server.offer_send(1000, sends)
    assert ticket is not None
    sock = connect(server, header(ticket) + b"a" * 600)  # then nothing, the connection held open
    data, how, took = drain(sock, IDLE_TIMEOUT_S + WAIT_S)
    assert (data, how) == (b"", "eof")  # no status: the parent gave up on a stalled sandbox
    assert IDLE_TIMEOUT_S * 0.9 <= took < IDLE_TIMEOUT_S + 1.0
    assert sends.bodies == []


def test_a_send_callable_refusal_becomes_the_status_line(server):
    sends = Sends(error=RequestRejected("RESOURCE_EXHAUSTED", "x"))
    ticket = server.offer_send(10, sends)
    assert ticket is not None
    assert drain(connect(server, header(ticket) + b"0123456789"))[0] == b"RESOURCE_EXHAUSTED x"


def test_an_unexpected_send_failure_is_internal_without_detail(server):
    sends = Sends(error=RuntimeError("/secret/host/path"))
    ticket = server.offer_send(10, sends)
    assert ticket is not None
    assert drain(connect(server, header(ticket) + b"0123456789"))[0] == b"INTERNAL internal error"


def test_bytes_past_the_announced_size_are_not_sent(server):
    sends = Sends()
    ticket = server.offer_send(10, sends)
    assert ticket is not None
    sock = connect(server, header(ticket) + b"0123456789" + b"EXTRA" * 100)
    status = ended(sock)  # a reset after it: the parent leaves the extra bytes unread
    assert status == b"OK"
    assert sends.bodies == [b"0123456789"]


# -- caps --------------------------------------------------------------------------------


def test_connections_beyond_the_cap_are_closed_at_once_and_the_first_still_work(server, monkeypatch):
    monkeypatch.setattr(bulk_module, "IDLE_TIMEOUT_S", 10.0)  # the held transfers outlast a slow run
    # An extra connection served (over the cap) would wait this long for its header: far from "at once".
    monkeypatch.setattr(bulk_module, "HEADER_TIMEOUT_S", SLOW_HEADER_S)
    cap = MAX_CONNECTIONS
    sends = Sends()
    tickets = [server.offer_send(10, sends) for _ in range(cap)]
    assert None not in tickets
    # Each holds a transfer open, half sent (the idle timeout is longer than this test's waits).
    held = [connect(server, header(t) + b"01234") for t in tickets]
    # A ticket slot is free once a held connection has presented its ticket: once there
    # are as many as held, every held one is being served, and none waits in the backlog
    # (where the extras would find no room and fail to connect with EAGAIN).
    offered: list[bytes] = []

    def offer() -> bool:
        ticket = server.offer_send(10, sends)
        offered.extend([ticket] if ticket is not None else [])
        return len(offered) == cap

    assert wait_for(offer, WAIT_S), f"only {len(offered)} of {cap} held connections were served"
    extra_ticket = offered[0]
    # The acceptor serves connections in order: these come after every held one.
    extras = [connect(server) for _ in range(3)] + [connect(server, header(extra_ticket) + b"0123456789")]
    for sock in extras:
        data, how, took = drain(sock)
        assert (data, how in ("eof", "reset")) == (b"", True)
        assert took < PROMPTLY_S
    for sock in held:
        sock.sendall(b"56789")
        sock.shutdown(socket.SHUT_WR)
        assert ended(sock) == b"OK"
    assert sends.bodies == [b"0123456789"] * cap
    # The extra connection never used its ticket: it still serves once the others are done.
    assert ended(connect(server, header(extra_ticket) + b"abcdefghij")) == b"OK"


@dataclass
class SlowToDiscard(Incoming):
    """A body whose clean-up takes until ``go`` is set, as deleting a large spool file on a busy disk may."""

    go: threading.Event = field(default_factory=threading.Event)

    def discard(self) -> None:
        self.go.wait(WAIT_S)
        super().discard()


def test_a_transfer_frees_its_connection_slot_before_the_sandbox_sees_it_end(server, monkeypatch):
    # A sandbox with as many transfers going as the cap allows starts its next one the
    # moment one ends: the parent's clean-up after that end must not cost it the slot.
    monkeypatch.setattr(bulk_module, "IDLE_TIMEOUT_S", 10.0)  # the held transfers outlast a slow run
    sends = Sends()
    held_tickets = [server.offer_send(10, sends) for _ in range(MAX_CONNECTIONS - 1)]
    assert None not in held_tickets
    held = [connect(server, header(t) + b"01234") for t in held_tickets]
    body = SlowToDiscard("ALGORITHM_EXCHANGE", 13, body=b"model weights")
    try:
        ticket = server.offer_receive(body)
        assert ticket is not None
        assert drain(connect(server, header(ticket)))[:2] == (b"model weights", "eof")
        # The held connections were accepted before it (in order) and still count; a ticket
        # slot is free once a connection has presented its ticket.
        offered: list[bytes | None] = []
        assert wait_for(lambda: offered.append(server.offer_send(10, sends)) or offered[-1] is not None)
        following = offered[-1]
        assert following is not None
        assert ended(connect(server, header(following) + b"0123456789")) == b"OK"
    finally:
        body.go.set()
        for sock in held:
            sock.close()
    assert sends.bodies == [b"0123456789"]


@pytest.fixture
def idle_server(sock_dir: Path) -> Iterator[BulkServer]:
    """A BulkServer listening but not yet accepting (its acceptor lags); closed afterwards."""
    srv = BulkServer(sock_dir / "bulk.sock", TOKEN, "task-1")
    yield srv
    srv.close()


def sandbox_client(path: Path) -> ParentClient:
    """The sandbox's own client for the bulk socket at ``path`` (no gRPC needed for it)."""
    return ParentClient(None, ((TOKEN_METADATA_KEY, TOKEN),), str(path))  # type: ignore[arg-type]


def test_the_backlog_holds_every_connection_a_sandbox_can_have_waiting(idle_server):
    # Each connection a sandbox opens presents its own unused ticket, so the cap on
    # tickets bounds how many can wait for a lagging acceptor: all of them must get
    # in at once (a connect with a timeout beyond the backlog fails with EAGAIN).
    sends = Sends()
    tickets = [idle_server.offer_send(10, sends) for _ in range(MAX_TICKETS)]
    assert None not in tickets
    waiting = []
    try:
        for i, ticket in enumerate(tickets):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            waiting.append(sock)
            sock.settimeout(WAIT_S)
            try:
                sock.connect(str(idle_server.path))
            except BlockingIOError:
                pytest.fail(f"connection {i + 1} of {MAX_TICKETS} found the backlog full")
            sock.sendall(header(ticket) + b"0123456789")
        idle_server.start()
        assert [ended(sock) for sock in waiting] == [b"OK"] * MAX_TICKETS
    finally:
        for sock in waiting:
            sock.close()
    assert sends.bodies == [b"0123456789"] * MAX_TICKETS


def test_the_sandbox_waits_for_room_in_a_full_backlog_instead_of_failing(sock_dir):
    # However the backlog filled up, a parent slow to accept costs the sandbox's
    # transfer time, not its failure.
    path = sock_dir / "bulk.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fillers: list[socket.socket] = []
    accepted: list[socket.socket] = []

    def make_room() -> None:
        with contextlib.suppress(OSError):
            accepted.append(listener.accept()[0])

    # The listener makes room only after the sandbox has found the backlog full.
    accepter = threading.Timer(PROMPTLY_S, make_room)
    try:
        listener.bind(str(path))
        listener.listen(1)
        while True:
            filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            fillers.append(filler)
            filler.setblocking(False)
            try:
                filler.connect(str(path))
            except BlockingIOError:
                break
        listener.settimeout(WAIT_S)
        accepter.start()
        ticket = secrets.token_bytes(16)
        with sandbox_client(path).bulk_connect(ticket):
            accepter.join(WAIT_S)
            for _ in fillers[1:]:
                accepted.append(listener.accept()[0])
            conn = accepted[-1]
            conn.settimeout(WAIT_S)
            assert conn.recv(len(header(ticket))) == header(ticket)
    finally:
        accepter.cancel()
        for s in (*fillers, *accepted, listener):
            s.close()
        accepter.join(WAIT_S)


def test_offers_beyond_the_ticket_cap_return_none(server):
    tickets = [server.offer_send(10, Sends()) for _ in range(MAX_TICKETS)]
    assert None not in tickets
    assert len(set(tickets)) == len(tickets)
    assert server.offer_send(10, Sends()) is None
    assert server.offer_receive(Incoming("ALGORITHM_EXCHANGE", 1, body=b"x")) is None
    # A ticket taken by a connection frees its slot.
    sock = connect(server, header(tickets[0]) + b"0123456789")
    assert ended(sock) == b"OK"
    assert server.offer_send(10, Sends()) is not None


# -- close ----------------------------------------------------------------------------------


def test_close_ends_transfers_drops_tickets_and_removes_the_socket(server, sock_dir):
    sends = Sends()
    sending = server.offer_send(10, sends)
    assert sending is not None
    in_progress = connect(server, header(sending) + b"01234")
    body = secrets.token_bytes(8 * MiB)  # more than the socket buffers hold: the parent blocks
    receiving = connect(server, header(receive_ticket(server, body)))
    spool = sock_dir / "unused-body"
    spool.write_bytes(b"x" * 100)
    assert server.offer_receive(Incoming("ALGORITHM_EXCHANGE", 100, path=spool)) is not None
    time.sleep(0.1)  # both transfers under way
    started = time.monotonic()
    server.close()
    took = time.monotonic() - started
    assert took < 1.0
    assert ended(in_progress) == b""  # no status: the transfer was ended, not completed
    got, _how, _ = drain(receiving)
    assert len(got) < len(body)
    assert sends.bodies == []
    assert not server.path.exists()
    assert not spool.exists()
    assert server.offer_send(10, Sends()) is None
    assert server.offer_receive(Incoming("ALGORITHM_EXCHANGE", 1, body=b"x")) is None
    with pytest.raises(FileNotFoundError):  # its socket is gone
        connect(server)
    server.close()  # twice is fine


# -- through the task's gRPC server ---------------------------------------------------------


@dataclass
class Served:
    """A running TaskServer, its session kit and a client stub."""

    kit: SessionKit
    token: str
    stub: pb_grpc.SandboxStub
    bulk_path: Path
    server: TaskServer

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA_KEY, self.token),)


@pytest.fixture
def served(make_session, sock_dir) -> Iterator[Served]:
    kit = make_session(max_message_bytes=4 * MiB, max_task_bytes=16 * MiB)
    token = secrets.token_urlsafe(32)
    socket_path = sock_dir / "sandbox.sock"
    srv = TaskServer(kit.session, token, socket_path)
    with contextlib.ExitStack() as cleanup:  # undone in reverse, even if a later step fails
        cleanup.callback(srv.stop, grace=0.2)
        srv.start()
        channel = grpc.insecure_channel(f"unix:{socket_path}", options=[("grpc.enable_retries", 0)])
        cleanup.callback(channel.close)
        yield Served(kit, token, pb_grpc.SandboxStub(channel), sock_dir / "bulk.sock", srv)


def _bulk(served: Served, ticket: bytes, body: bytes = b"", token: str = "") -> bytes:
    """What the parent answers a bulk connection that presents ``ticket`` (and sends ``body``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(str(served.bulk_path))
    raw = (token or served.token).encode()
    try:
        sock.sendall(BULK_MAGIC + bytes([len(raw)]) + raw + ticket + body)
        if body:
            sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # closed by the parent already
    return ended(sock)


def _open(served: Served, message_type: int, size: int, metadata=None) -> tuple[grpc.StatusCode, str]:
    try:
        served.stub.OpenBulkSend(
            pb.BulkSendRequest(type=message_type, total_size=size),
            metadata=served.auth if metadata is None else metadata,
            timeout=10,
        )
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def test_open_bulk_send_round_trip_reaches_the_modeller(served):
    body = secrets.token_bytes(3 * MiB)
    ticket = served.stub.OpenBulkSend(
        pb.BulkSendRequest(type=pb.TRAINING_UPDATE, total_size=len(body)), metadata=served.auth, timeout=10
    ).ticket
    assert _bulk(served, ticket, body) == b"OK"
    got = served.kit.modeller.receive(served.kit.task_id, timeout=2)
    assert got is not None
    assert (got.type, got.read()) == ("TRAINING_UPDATE", body)
    assert _bulk(served, ticket, body) == b""  # single use
    assert served.kit.modeller.receive(served.kit.task_id, timeout=0.2) is None


def test_open_bulk_send_refuses_what_a_send_would(served):
    limit = 4 * MiB
    assert _open(served, pb.ALGORITHM_EXCHANGE, 10) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "a sandbox may not send ALGORITHM_EXCHANGE messages",
    )
    for size in (limit + 1, 2**64 - 1):
        assert _open(served, pb.TRAINING_UPDATE, size) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"outgoing message is {size} bytes; the limit is {limit}",
        )
    assert _open(served, pb.TRAINING_UPDATE, 10, ((TOKEN_METADATA_KEY, served.token[:-1] + "x"),))[0] is (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert _open(served, pb.TRAINING_UPDATE, 10, ())[0] is grpc.StatusCode.UNAUTHENTICATED


def test_open_bulk_send_beyond_the_ticket_cap_is_resource_exhausted(served):
    for _ in range(MAX_TICKETS):
        assert _open(served, pb.TRAINING_UPDATE, 10) == (grpc.StatusCode.OK, "")
    assert _open(served, pb.TRAINING_UPDATE, 10) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "too many bulk transfers are open at once",
    )


def test_open_bulk_send_after_finish_is_refused_and_so_is_a_ticket_taken_before(served):
    ticket = served.stub.OpenBulkSend(
        pb.BulkSendRequest(type=pb.TRAINING_UPDATE, total_size=10), metadata=served.auth, timeout=10
    ).ticket
    served.stub.Finish(pb.FinishRequest(status=pb.OK, result_json="1"), metadata=served.auth, timeout=10)
    assert _open(served, pb.TRAINING_UPDATE, 10) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "the task has already finished",
    )
    # The sandbox's extra bytes stay unread, so the close may reach it as a reset: the status is what counts.
    assert _bulk(served, ticket, b"0123456789") == b"FAILED_PRECONDITION the task has already finished"
    assert served.kit.modeller.receive(served.kit.task_id, timeout=0.2) is None


def test_receive_with_bulk_min_bytes_answers_a_ticket_and_the_body_comes_raw(served):
    kit = served.kit
    body = secrets.token_bytes(3 * MiB)
    kit.modeller.send(kit.task_id, "ALGORITHM_EXCHANGE", body)
    chunks = list(
        served.stub.ReceiveMessage(
            pb.ReceiveMessageRequest(type=pb.ALGORITHM_EXCHANGE, timeout_ms=2000, bulk_min_bytes=2 * MiB),
            metadata=served.auth,
            timeout=10,
        )
    )
    assert len(chunks) == 1
    (chunk,) = chunks
    assert (chunk.type, chunk.total_size, chunk.data, len(chunk.bulk_ticket)) == (
        pb.ALGORITHM_EXCHANGE,
        len(body),
        b"",
        16,
    )
    # Another task's token does not fetch it; this task's does, once.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(str(served.bulk_path))
    other = secrets.token_urlsafe(32).encode()
    sock.sendall(BULK_MAGIC + bytes([len(other)]) + other + chunk.bulk_ticket)
    assert ended(sock) == b""
    assert _bulk(served, chunk.bulk_ticket) == body
    assert _bulk(served, chunk.bulk_ticket) == b""


@pytest.mark.parametrize("bulk_min_bytes", [0, 4 * MiB])
def test_receive_below_bulk_min_bytes_streams_chunks(served, bulk_min_bytes):
    kit = served.kit
    body = secrets.token_bytes(3 * MiB)
    kit.modeller.send(kit.task_id, "ALGORITHM_EXCHANGE", body)
    chunks = list(
        served.stub.ReceiveMessage(
            pb.ReceiveMessageRequest(
                type=pb.ALGORITHM_EXCHANGE, timeout_ms=2000, bulk_min_bytes=bulk_min_bytes
            ),
            metadata=served.auth,
            timeout=10,
        )
    )
    assert len(chunks) > 1
    assert not any(c.bulk_ticket for c in chunks)
    assert chunks[0].total_size == len(body)
    assert b"".join(c.data for c in chunks) == body


def test_stopping_the_task_server_ends_bulk_transfers_and_removes_the_bulk_socket(served):
    assert served.bulk_path.exists()
    ticket = served.stub.OpenBulkSend(
        pb.BulkSendRequest(type=pb.TRAINING_UPDATE, total_size=10), metadata=served.auth, timeout=10
    ).ticket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(WAIT_S)
    sock.connect(str(served.bulk_path))
    raw = served.token.encode()
    sock.sendall(BULK_MAGIC + bytes([len(raw)]) + raw + ticket + b"01234")  # and the rest never
    time.sleep(0.1)
    served.server.stop(grace=0.2)
    assert ended(sock) == b""
    assert not served.bulk_path.exists()
    assert served.kit.modeller.receive(served.kit.task_id, timeout=0.2) is None


def test_more_threads_than_the_bulk_caps_all_move_large_bodies(make_session, sock_dir, request):
    # The contract lets a protocol send and receive from as many threads as it likes:
    # past the bulk caps, a transfer waits for a slot instead of being refused
    # (RESOURCE_EXHAUSTED) or closed at once (a broken pipe, a cut body).
    senders, sends_each, receivers = 2 * MAX_CONNECTIONS, 2, MAX_TICKETS
    body = secrets.token_bytes(2 * MiB + 1)  # the bulk path
    total = (senders * sends_each + receivers) * len(body)
    kit = make_session(max_message_bytes=4 * MiB, max_task_bytes=total + MiB)
    token = secrets.token_urlsafe(32)
    srv = TaskServer(kit.session, token, sock_dir / "sandbox.sock")
    request.addfinalizer(lambda: srv.stop(grace=0.2))
    srv.start()
    channel = grpc.insecure_channel(f"unix:{sock_dir / 'sandbox.sock'}", options=[("grpc.enable_retries", 0)])
    request.addfinalizer(channel.close)
    auth = ((TOKEN_METADATA_KEY, token),)
    client = ParentClient(pb_grpc.SandboxStub(channel), auth, str(sock_dir / "bulk.sock"))
    config = pb.TaskConfig(task_id=kit.task_id, chunk_bytes=64 * 1024, max_message_bytes=4 * MiB)
    ctx = Context(config, client, sock_dir / "scratch")
    for _ in range(receivers):
        kit.modeller.send(kit.task_id, "ALGORITHM_EXCHANGE", body)
    errors: list[str] = []
    received: list[bytes] = []

    def send() -> None:
        for _ in range(sends_each):
            try:
                ctx.mailbox.send("TRAINING_UPDATE", body)
            except Exception as exc:
                errors.append(f"send: {type(exc).__name__}: {exc}")

    def receive() -> None:
        try:
            received.append(ctx.mailbox.receive("ALGORITHM_EXCHANGE", timeout=WAIT_S))
        except Exception as exc:
            errors.append(f"receive: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=send) for _ in range(senders)]
    threads += [threading.Thread(target=receive) for _ in range(receivers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20.0)
    assert errors == []
    assert received == [body] * receivers
    sent = [kit.modeller.receive(kit.task_id, WAIT_S) for _ in range(senders * sends_each)]
    assert all(m is not None and m.read() == body for m in sent)
