"""A received mailbox body of an announced size, written in place as its chunks or bulk bytes arrive."""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import socket

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
