"""What this process holds open, read from /proc: host-side evidence for tests of the parent."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path


def open_files() -> int:
    """How many file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def _socket_inodes() -> set[str]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def connections_of(socket_path: Path, netns_of: Iterable[int | str] = ("self",)) -> int:
    """Connections this process holds open on the Unix socket it listens on at ``socket_path``.

    An accepted Unix socket carries its listener's path in /proc/net/unix,
    but it lives in the network namespace of the client that connected: a
    container's connections are listed only in the /proc/PID/net/unix of a
    process in the container's namespace. ``netns_of`` names such processes
    (by default this one). State 03 (connected) leaves the listener out, and a
    client's own socket has no path.
    """
    mine, path, seen, count = _socket_inodes(), str(socket_path), set(), 0
    for pid in netns_of:
        try:
            netns = os.readlink(f"/proc/{pid}/ns/net")
            if netns in seen:
                continue
            seen.add(netns)
            with open(f"/proc/{pid}/net/unix") as f:
                lines = f.readlines()[1:]
        except OSError:  # the process is gone
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 7 and fields[7] == path and fields[5] == "03" and fields[6] in mine:
                count += 1
    return count


def cgroup_pids(pid: int) -> list[int]:
    """Every process in ``pid``'s cgroup (a container's processes, from its init's pid)."""
    pids: set[int] = set()
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, group = line.rstrip("\n").split(":", 2)
            base = "/sys/fs/cgroup" if controllers == "" else "/sys/fs/cgroup/pids"
            if controllers not in ("", "pids"):
                continue
            try:
                with open(f"{base}{group}/cgroup.procs") as procs:
                    pids.update(int(p) for p in procs.read().split())
            except OSError:
                continue
    return sorted(pids)
