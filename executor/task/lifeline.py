"""The parent's end of a sandbox's lifeline: one held connection whose loss ends the sandbox.

The sandbox's init (pid 1, out of the protocol's reach) connects once, before
the runtime starts, and blocks reading it. The parent accepts that single
connection, stops listening and removes the socket file, then holds the
connection, reading nothing and sending nothing, for the task's life. When the
parent closes it, or dies and the kernel closes it, init reads end-of-file and
kills the whole sandbox: no protocol behaviour can keep a sandbox alive
without its parent.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

log = logging.getLogger(__name__)

# How long close() waits for the accepting thread, which it has just woken.
_JOIN_S = 1.0


class Lifeline:
    """Listens on ``path`` for the sandbox init's one connection and holds it.

    Args:
        path: Where to listen (in the task's IPC directory).
        on_connect: Called (on the accepting thread) once the one connection
            is held; an exception from it is logged, never raised.
    """

    def __init__(self, path: Path, on_connect: Callable[[], None] | None = None) -> None:
        self.path = path
        self._on_connect = on_connect
        self._stop = threading.Event()
        self._held: socket.socket | None = None
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(path))
            self._listener.listen(1)
        except OSError:
            self._listener.close()
            raise
        self._thread = threading.Thread(target=self._accept, name=f"lifeline-{path.parent.name}", daemon=True)

    @property
    def connected(self) -> bool:
        """Whether the sandbox's init has connected."""
        return self._held is not None

    def start(self) -> None:
        """Start waiting for the one connection."""
        self._thread.start()

    def _accept(self) -> None:
        try:
            conn, _ = self._listener.accept()
        except OSError as exc:
            if not self._stop.is_set():  # else close() woke it: nobody came
                log.warning("lifeline %s: accept failed: %s", self.path, exc)
            return
        finally:
            # One connection only: nothing else may take the sandbox's place.
            self._stop_listening()
        with self._lock:
            if self._stop.is_set():
                conn.close()
                return
            self._held = conn
        if self._on_connect is not None:
            try:
                self._on_connect()
            except Exception:
                log.exception("%s: the connect listener failed", self.path)

    def _stop_listening(self) -> None:
        self._listener.close()
        with contextlib.suppress(OSError):
            self.path.unlink()

    def close(self) -> None:
        """Let go: a sandbox still running stops by itself."""
        self._stop.set()
        with self._lock:
            held, self._held = self._held, None
        if held is not None:
            held.close()
        if self._thread.is_alive():
            # A listening socket shut down refuses accept() at once (EINVAL),
            # so the waiting thread ends now rather than at a poll's next turn.
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
            self._thread.join(_JOIN_S)
        else:
            self._stop_listening()


class StartLine(Lifeline):
    """Where a warm sandbox's runtime waits for its task: the task comes down it; end-of-file says never.

    The runtime connects once it has booted and blocks reading, which costs
    nothing while it waits (a blocked gRPC call wakes several times a second,
    which adds up under gVisor). The parent accepts that one connection, like
    the lifeline's, before any protocol code exists in the sandbox, and
    writes :data:`GO`, the configuration's length (4 bytes, big-endian) and
    the configuration once the slot has its task: the runtime needs no call
    to fetch it. The runtime's first beat comes back the same way
    (:meth:`answer_first_beat`), a byte each way instead of a gRPC stream's
    set-up before any protocol code may run; then the line is closed.
    """

    GO = b"\x01"
    BEAT = b"\x02"
    SEEN = b"\x03"

    @property
    def waiting(self) -> bool:
        """Whether the runtime has connected and still waits (it has not hung up)."""
        with self._lock:
            conn = self._held
        if conn is None:
            return False
        try:
            readable, _, _ = select.select([conn], [], [], 0)
            # The runtime never writes: readable means it hung up (it died).
            return not readable or conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except (OSError, ValueError):
            return False

    def go(self, config: bytes) -> bool:
        """Hand the waiting runtime its task's configuration; ``False`` if it is not (or no longer) there."""
        with self._lock:
            conn = self._held
        if conn is None:
            return False
        try:
            conn.sendall(self.GO + len(config).to_bytes(4, "big") + config)
        except OSError:
            return False
        return True

    def answer_first_beat(self, on_beat: Callable[[], None], timeout_s: float) -> None:
        """On a thread: read the runtime's first beat, record it (``on_beat``), answer SEEN, let go.

        Anything else (nothing within ``timeout_s``, a hang-up, another byte)
        only closes the line: the runtime then waits for the heartbeat
        stream's own confirmation, as a cold one does.
        """

        def answer() -> None:
            with self._lock:
                conn = self._held
            try:
                if conn is None:
                    return
                conn.settimeout(timeout_s)
                if conn.recv(1) == self.BEAT:
                    on_beat()
                    conn.sendall(self.SEEN)
            except OSError:
                pass
            finally:
                self.close()

        threading.Thread(target=answer, name=f"first-beat-{self.path.parent.name}", daemon=True).start()
