"""What the kernel's cgroups say a running container has used: CPU time, OOM kills, refused forks.

The parent reads these from the host's cgroup files, never from inside the
sandbox, so the sandbox cannot lie about them. They tell a *slow* sandbox
(its CPU time still advances: a busy host, a boot that takes long) from a
*frozen* one (no heartbeat and no CPU), enforce a CPU-time budget for the
whole container whatever it forks, and name an out-of-memory kill or a fork
refused at the pids cap that a runtime reports no other way (under gVisor
the sandbox may hang rather than exit when the host kills part of it).

Both cgroup layouts are read: v1 (a hierarchy per controller, ``cpuacct``,
``memory``, ``pids``) and v2 (one unified tree), and hybrids of the two. A
process's cgroup is found from ``/proc/PID/cgroup`` and the mount points in
``/proc/self/mountinfo``; the parent must see the host's cgroup tree (it does
when it runs on the host, as root or not: the files read are world-readable).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    """A container's use of the host so far, read from its cgroups; ``None`` where unknown.

    Attributes:
        cpu_s: CPU seconds (user and system) its processes have used since it started.
        oom_kills: Processes of it the kernel's OOM killer has killed.
        pids_refused: Forks (or threads) refused because it reached its pids cap.
    """

    cpu_s: float | None = None
    oom_kills: int | None = None
    pids_refused: int | None = None


@dataclass(frozen=True)
class Scheduling:
    """Whether a container's threads want the host's CPU or wait on its kernel, read from the host's /proc.

    A container whose CPU time stands still is not frozen if its threads
    are runnable but get no CPU (a host busier than its cores) or are in an
    uninterruptible wait (the engine's storage, a FUSE daemon starved too).

    Attributes:
        waited_s: Seconds its threads have spent runnable but waiting for a
            CPU, summed (the second figure of each ``/proc/<tid>/schedstat``).
        active: Its threads running, runnable or in an uninterruptible wait
            now (state ``R`` or ``D``).
        threads: Its threads.
    """

    waited_s: float
    active: int
    threads: int


@dataclass(frozen=True)
class CgroupPaths:
    """Where one process's cgroup files live (a directory per controller that was found)."""

    cpu: Path | None = None
    memory: Path | None = None
    pids: Path | None = None
    cpu_v2: bool = False
    memory_v2: bool = False

    def read(self) -> Usage:
        """The usage now; a file that cannot be read (the cgroup is gone) gives ``None`` for its figure."""
        return Usage(
            cpu_s=_cpu_seconds(self.cpu, self.cpu_v2),
            oom_kills=_keyed(
                self.memory, "memory.events" if self.memory_v2 else "memory.oom_control", "oom_kill"
            ),
            pids_refused=_keyed(self.pids, "pids.events", "max"),
        )

    def scheduling(self, *, proc: Path = Path("/proc")) -> Scheduling | None:
        """How its threads stand with the scheduler now; ``None`` if the cgroup or /proc cannot tell."""
        if self.cpu is None:
            return None
        listing = _read(self.cpu / ("cgroup.threads" if self.cpu_v2 else "tasks"))
        if listing is None:
            return None
        waited_ns = active = threads = 0
        for tid in listing.split():
            stat = _read(proc / tid / "stat")
            sched = _read(proc / tid / "schedstat")
            if stat is None or sched is None:
                continue  # it ended between the listing and the read
            threads += 1
            state = stat.rsplit(")", 1)[-1].split()[:1]
            if state and state[0] in ("R", "D"):
                active += 1
            fields = sched.split()
            if len(fields) >= 2 and fields[1].isdigit():
                waited_ns += int(fields[1])
        return Scheduling(waited_s=waited_ns / 1e9, active=active, threads=threads)


def _mounts(mountinfo: str) -> tuple[dict[str, tuple[Path, str]], tuple[Path, str] | None]:
    """The v1 controller -> (mount point, mount root) map, and the v2 mount, from mountinfo text."""
    v1: dict[str, tuple[Path, str]] = {}
    v2: tuple[Path, str] | None = None
    for line in mountinfo.splitlines():
        fields = line.split()
        try:
            dash = fields.index("-")
        except ValueError:
            continue
        if len(fields) < dash + 4:
            continue
        root, point = _unescape(fields[3]), Path(_unescape(fields[4]))
        fstype, options = fields[dash + 1], fields[dash + 3]
        if fstype == "cgroup2" and v2 is None:
            v2 = (point, root)
        elif fstype == "cgroup":
            for option in options.split(","):
                v1.setdefault(option, (point, root))
    return v1, v2


def _unescape(text: str) -> str:
    """Undo mountinfo's octal escapes of space, tab, newline and backslash."""
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and len(text[i + 1 : i + 4]) == 3 and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def _under(mount: tuple[Path, str], path: str) -> Path:
    """The directory of cgroup ``path`` (as /proc/PID/cgroup names it) under ``mount``."""
    point, root = mount
    rel = path
    if root != "/" and (path == root or path.startswith(root.rstrip("/") + "/")):
        rel = path[len(root.rstrip("/")) :]
    return point / rel.lstrip("/")


def paths_of(pid: int, *, proc: Path = Path("/proc")) -> CgroupPaths | None:
    """The cgroup directories of host process ``pid``; ``None`` if they cannot be found.

    A controller mounted in v1 wins over the unified tree, which holds it only
    when no v1 hierarchy does (the kernel gives a controller to one of them).
    """
    try:
        lines = (proc / str(pid) / "cgroup").read_text().splitlines()
        v1, v2 = _mounts((proc / "self" / "mountinfo").read_text())
    except OSError as exc:
        log.debug("cgroups of process %d: %s", pid, exc)
        return None
    unified: Path | None = None
    found: dict[str, Path] = {}
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            if v2 is not None:
                unified = _under(v2, path)
            continue
        for controller in controllers.split(","):
            mount = v1.get(controller)
            if mount is not None:
                found.setdefault(controller, _under(mount, path))
    available: set[str] = set()
    if unified is not None:
        try:
            available = set((unified / "cgroup.controllers").read_text().split())
        except OSError:
            available = set()

    def pick(v1_name: str, v2_name: str) -> tuple[Path | None, bool]:
        if v1_name in found:
            return found[v1_name], False
        if unified is not None and v2_name in available:
            return unified, True
        return None, False

    cpu, cpu_v2 = pick("cpuacct", "cpu")
    if cpu is None and unified is not None and (unified / "cpu.stat").exists():
        cpu, cpu_v2 = unified, True  # cpu.stat's usage_usec is there even without the cpu controller
    memory, memory_v2 = pick("memory", "memory")
    pids, _ = pick("pids", "pids")
    return CgroupPaths(cpu=cpu, memory=memory, pids=pids, cpu_v2=cpu_v2, memory_v2=memory_v2)


def _read(path: Path) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, ValueError):
        return None


def _cpu_seconds(directory: Path | None, v2: bool) -> float | None:
    if directory is None:
        return None
    if not v2:
        text = _read(directory / "cpuacct.usage")
        try:
            return int(text) / 1e9 if text is not None else None
        except ValueError:
            return None
    usec = _keyed(directory, "cpu.stat", "usage_usec")
    return usec / 1e6 if usec is not None else None


def _keyed(directory: Path | None, name: str, key: str) -> int | None:
    """The integer after ``key`` in a flat-keyed cgroup file (``key value`` lines)."""
    if directory is None:
        return None
    text = _read(directory / name)
    if text is None:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            try:
                return int(parts[1])
            except ValueError:
                return None
    return None


def readable() -> bool:
    """Whether this process can see cgroup files at all (it can read its own)."""
    paths = paths_of(os.getpid())
    return paths is not None and paths.read().cpu_s is not None


class OomWatch:
    """The kernel's own notice of an OOM kill in a cgroup v1 memory controller, kept after the cgroup goes.

    Reading ``memory.oom_control`` now and then can miss an OOM kill under
    gVisor: the kernel kills one of its stub processes, gVisor ends the whole
    sandbox, and the container's cgroup is gone within milliseconds. The
    engine's own flag comes from the same notice, and can lose that race too.
    This registers an eventfd on ``memory.oom_control`` (``cgroup.event_control``,
    writable by root only) and counts what it signals: the kernel signals it
    once per OOM event and once more when the cgroup is removed, so two
    signals or more mean an OOM kill happened.
    """

    def __init__(self, memory_dir: Path) -> None:
        # Non-blocking: the kernel keeps the count until it is read, so no thread waits on it.
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            ofd = os.open(memory_dir / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                with open(memory_dir / "cgroup.event_control", "w", encoding="ascii") as control:
                    control.write(f"{self._efd} {ofd}")
            finally:
                os.close(ofd)
        except BaseException:
            os.close(self._efd)
            raise
        self._signals = 0
        self._lock = threading.Lock()

    @classmethod
    def of(cls, paths: CgroupPaths | None) -> OomWatch | None:
        """A watch on ``paths``' memory cgroup; ``None`` where the host allows none (v2, not root)."""
        if paths is None or paths.memory is None or paths.memory_v2:
            return None
        try:
            return cls(paths.memory)
        except OSError as exc:
            log.debug("no OOM watch on %s: %s", paths.memory, exc)
            return None

    def oom_killed(self, wait_s: float) -> bool:
        """Whether the kernel signalled an OOM kill, waiting up to ``wait_s`` for the removal notice."""
        end = time.monotonic() + wait_s
        with self._lock:
            while self._signals < 2:
                try:
                    self._signals += os.eventfd_read(self._efd)
                    continue
                except BlockingIOError:
                    pass
                except OSError:
                    break  # closed
                left = end - time.monotonic()
                if left <= 0:
                    break
                select.select([self._efd], [], [], left)
            return self._signals >= 2

    def close(self) -> None:
        """Stop watching; safe twice."""
        with self._lock:
            fd, self._efd = self._efd, -1
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
