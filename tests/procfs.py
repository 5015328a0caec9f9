"""What this process holds open, read from /proc: host-side evidence for tests of the parent."""

from __future__ import annotations

import os
from pathlib import Path


def open_files() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def connections_of(socket_path: Path) -> int:
    """Connections this process holds open on the Unix socket it listens on at ``socket_path``.

    An accepted Unix socket carries its listener's path in /proc/net/unix;
    state 03 (connected) leaves the listener itself out, and a client's own
    socket has no path.
    """
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    path, count = str(socket_path), 0
    with open("/proc/net/unix") as f:
        next(f)
        for line in f:
            fields = line.split()
            if len(fields) > 7 and fields[7] == path and fields[5] == "03" and fields[6] in inodes:
                count += 1
    return count
