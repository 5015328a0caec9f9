"""Test protocol: can the sandbox lock, lease or watch a data view's file, or reach io_uring?

A view's file is a hard link to (or a bind mount of) the operator's own inode,
so a lock or a watch taken on it would reach the operator and other tasks.
For each call the protocol reports ``"ok"`` or the errno's name. It tries
every lock it can on ``parameters["file"]`` and keeps whatever it got, tells
the parent so (a STEP event with info ``"holding"``, which the test answers
by locking and reading the original file from outside), waits
``parameters["hold_s"]``, then reads what its watch (if it got one) saw.

The calls a protocol still needs (fcntl's descriptor and status flags, pipe
sizes, seals) are tried too, and ``sqlite`` reports how a read of
``parameters["db"]`` fares with SQLite's default locking and with
``immutable=1`` or ``nolock=1`` (the row count, or the error): the reads stay open while it
holds, so a shared lock SQLite got would hold off the operator's writer.
With ``parameters["mode"] == "symlink"`` it instead reports whether a
symbolic link can be made in /tmp (for a policy's own profile).
"""

import ctypes
import errno
import fcntl
import os
import platform
import select
import sqlite3
import struct
import time
from pathlib import Path

# Raw numbers: inotify and io_uring have no wrappers in Python.
SYSCALLS = {
    "x86_64": {"inotify_init": 253, "inotify_add_watch": 254, "inotify_init1": 294},
    "aarch64": {"inotify_add_watch": 27, "inotify_init1": 26},
}
IO_URING = {"io_uring_setup": 425, "io_uring_enter": 426, "io_uring_register": 427}  # every architecture
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38
F_SETLEASE, F_GETLEASE, F_NOTIFY = 1024, 1025, 1026
F_DUPFD_CLOEXEC, F_SETPIPE_SZ, F_GETPIPE_SZ, F_ADD_SEALS, F_GET_SEALS = 1030, 1031, 1032, 1033, 1034
DN_ACCESS, DN_MULTISHOT = 0x1, 0x80000000
IN_ALL_EVENTS = 0xFFF
F_SEAL_SEAL = 0x1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _name(code):
    return errno.errorcode.get(code, str(code))


def _call(fn):
    try:
        fn()
    except OSError as exc:
        return _name(exc.errno)
    return "ok"


def _raw(name, *args):
    """``(return value, "ok" or the errno's name)`` of a raw system call."""
    table = {**SYSCALLS.get(platform.machine(), {}), **IO_URING}
    if name not in table:
        return -1, "absent on this architecture"
    ctypes.set_errno(0)
    ret = _libc.syscall(
        ctypes.c_long(table[name]), *(ctypes.c_long(a) if isinstance(a, int) else a for a in args)
    )
    return ret, ("ok" if ret >= 0 else _name(ctypes.get_errno()))


def _flock_struct(kind):
    # struct flock on 64-bit Linux: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid.
    return struct.pack("hhqqi", kind, os.SEEK_SET, 0, 0, 0)


def _locks(fd, directory_fd):
    read_lock = _flock_struct(fcntl.F_RDLCK)
    return {
        "flock_ex": _call(lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)),
        "flock_sh": _call(lambda: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)),
        "F_GETLK": _call(lambda: fcntl.fcntl(fd, fcntl.F_GETLK, read_lock)),
        "F_SETLK": _call(lambda: fcntl.fcntl(fd, fcntl.F_SETLK, read_lock)),
        "F_SETLKW": _call(lambda: fcntl.fcntl(fd, fcntl.F_SETLKW, read_lock)),
        "F_OFD_GETLK": _call(lambda: fcntl.fcntl(fd, F_OFD_GETLK, read_lock)),
        "F_OFD_SETLK": _call(lambda: fcntl.fcntl(fd, F_OFD_SETLK, read_lock)),
        "F_SETLEASE": _call(lambda: fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)),
        "F_GETLEASE": _call(lambda: fcntl.fcntl(fd, F_GETLEASE)),
        "F_NOTIFY": _call(lambda: fcntl.fcntl(directory_fd, F_NOTIFY, DN_ACCESS | DN_MULTISHOT)),
    }


def _still_works(fd):
    """What protocols, glibc and grpc need of fcntl: each must succeed."""
    out = {
        "F_GETFL": _call(lambda: fcntl.fcntl(fd, fcntl.F_GETFL)),
        "F_SETFL": _call(
            lambda: fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NONBLOCK)
        ),
        "F_GETFD": _call(lambda: fcntl.fcntl(fd, fcntl.F_GETFD)),
        "F_SETFD": _call(lambda: fcntl.fcntl(fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC)),
        "F_DUPFD_CLOEXEC": _call(lambda: os.close(fcntl.fcntl(fd, F_DUPFD_CLOEXEC, 10))),
    }
    r, w = os.pipe()
    try:
        out["F_SETPIPE_SZ"] = _call(lambda: fcntl.fcntl(w, F_SETPIPE_SZ, 1 << 16))
        out["F_GETPIPE_SZ"] = _call(lambda: fcntl.fcntl(r, F_GETPIPE_SZ))
    finally:
        os.close(r)
        os.close(w)
    memfd = os.memfd_create("probe", os.MFD_ALLOW_SEALING)
    try:
        out["F_ADD_SEALS"] = _call(lambda: fcntl.fcntl(memfd, F_ADD_SEALS, F_SEAL_SEAL))
        out["F_GET_SEALS"] = _call(lambda: fcntl.fcntl(memfd, F_GET_SEALS))
    finally:
        os.close(memfd)
    return out


def _sqlite_read(db, uri_params):
    """A read transaction left open (SQLite's default locking then holds a shared lock), or its error."""
    try:
        conn = sqlite3.connect(f"file:{db}?{uri_params}", uri=True, timeout=0, isolation_level=None)
    except sqlite3.Error as exc:
        return None, f"{type(exc).__name__}: {exc}"
    try:
        conn.execute("begin")
        return conn, conn.execute("select count(*) from t").fetchone()[0]
    except sqlite3.Error as exc:
        conn.close()
        return None, f"{type(exc).__name__}: {exc}"


def run(ctx):
    params = dict(ctx.parameters)
    if params.get("mode") == "symlink":
        target = "/tmp/probe-link"
        result = {"symlink": _call(lambda: os.symlink("/tmp", target)), "flock": "not tried"}
        fd = os.open("/tmp", os.O_RDONLY)
        try:
            result["flock"] = _call(lambda: fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB))
        finally:
            os.close(fd)
        return result
    path = Path(ctx.data_dir) / params["file"]
    fd = os.open(path, os.O_RDONLY)
    directory_fd = os.open(ctx.data_dir, os.O_RDONLY)
    readers, sqlite = [], {}
    try:
        if params.get("db"):
            db = Path(ctx.data_dir) / params["db"]
            for label, uri_params in (
                ("default", "mode=ro"),
                ("immutable", "immutable=1"),
                ("nolock", "mode=ro&nolock=1"),
            ):
                conn, sqlite[label] = _sqlite_read(db, uri_params)
                if conn is not None:
                    readers.append(conn)
        calls = _locks(fd, directory_fd)
        inotify, calls["inotify_init1"] = _raw("inotify_init1", os.O_NONBLOCK)
        old, calls["inotify_init"] = _raw("inotify_init")
        if old >= 0:
            os.close(old)
        # On a descriptor that is not inotify's, the kernel says EBADF unless the call is refused first.
        watch_fd = inotify if inotify >= 0 else -1
        _, calls["inotify_add_watch"] = _raw("inotify_add_watch", watch_fd, str(path).encode(), IN_ALL_EVENTS)
        _, calls["io_uring_setup"] = _raw("io_uring_setup", 1, None)  # EFAULT if reachable
        _, calls["io_uring_enter"] = _raw("io_uring_enter", -1, 0, 0, 0, None, 0)  # EBADF if reachable
        _, calls["io_uring_register"] = _raw("io_uring_register", -1, 0, None, 0)  # EBADF if reachable
        ctx.progress.step(1, 1, "holding")
        time.sleep(float(params.get("hold_s", 1.0)))
        watch_saw = False
        if inotify >= 0:
            watch_saw = bool(select.select([inotify], [], [], 0.5)[0])
            os.close(inotify)
        return {
            "calls": calls,
            "still_works": _still_works(fd),
            "watch_saw_outside_access": watch_saw,
            "sqlite": sqlite,
        }
    finally:
        for conn in readers:
            conn.close()
        os.close(fd)
        os.close(directory_fd)
