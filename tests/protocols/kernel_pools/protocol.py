"""Test protocol: the kernel's per-user pools, from a hog's side and a victim's.

``{"role": "hog"}`` takes as much as one user may hold of inotify instances,
POSIX message-queue bytes (RLIMIT_MSGQUEUE) and pipe pages
(pipe-user-pages-soft), says so with TASK_START, and holds it all until the
modeller's MODELLER_RESPONSE arrives. ``{"role": "victim"}`` then asks for a
little of each, as any innocent task would. Both report what the kernel said;
the test judges. If every sandbox ran as the same host uid, the victim would
find the hog's pools empty: EMFILE for inotify and mq_open, 8 KiB pipes.
"""

import ctypes
import errno
import fcntl
import os

F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
PIPE_MAX = 1024 * 1024
DEFAULT_PIPE = 65536
MQ_MSGS, MQ_MSGSIZE = 10, 8192  # the kernel's default queue, 80 KiB

_libc = ctypes.CDLL(None, use_errno=True)


class MqAttr(ctypes.Structure):
    _fields_ = [
        ("mq_flags", ctypes.c_long),
        ("mq_maxmsg", ctypes.c_long),
        ("mq_msgsize", ctypes.c_long),
        ("mq_curmsgs", ctypes.c_long),
        ("pad", ctypes.c_long * 4),
    ]


def _ename(code):
    return errno.errorcode.get(code, str(code))


def inotify():
    fd = _libc.inotify_init1(os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    return fd


def mqueue(name):
    attr = MqAttr(0, MQ_MSGS, MQ_MSGSIZE, 0)
    fd = _libc.mq_open(name.encode(), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600, ctypes.byref(attr))
    if fd < 0:
        raise OSError(ctypes.get_errno(), "mq_open")
    return fd


def _until_refused(make, limit):
    """Call ``make`` until the kernel refuses (at most ``limit`` times): (made, errno name)."""
    made = []
    try:
        while len(made) < limit:
            made.append(make(len(made)))
    except OSError as exc:
        return made, _ename(exc.errno)
    return made, ""


def _big_pipe(_index):
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_MAX)
    except OSError:
        os.close(r)
        os.close(w)
        raise
    return r, w


def hog(ctx):
    held = {}
    fds, held["inotify"] = _until_refused(lambda _i: inotify(), 200)
    held["inotify_count"] = len(fds)
    queues, held["mqueue"] = _until_refused(lambda i: mqueue(f"/hog-{i}"), 50)
    held["mqueue_count"] = len(queues)
    pipes, held["pipe"] = _until_refused(_big_pipe, 100)
    # Top up with default pipes until the kernel starts handing out small ones:
    # then the user is past pipe-user-pages-soft.
    for _ in range(64):
        try:
            pipes.append(os.pipe())
        except OSError as exc:
            held["pipe"] += "+" + _ename(exc.errno)
            break
        if fcntl.fcntl(pipes[-1][1], F_GETPIPE_SZ) < DEFAULT_PIPE:
            held["pipe"] += "+small"
            break
    held["pipe_count"] = len(pipes)
    held["uid"] = os.getuid()
    ctx.mailbox.send_task_start()  # "I hold it all"
    ctx.mailbox.await_modeller_response(timeout=float(ctx.parameters.get("hold_s", 90)))
    return held


def victim(ctx):
    got = {"uid": os.getuid()}
    try:
        os.close(inotify())
        got["inotify"] = "ok"
    except OSError as exc:
        got["inotify"] = _ename(exc.errno)
    try:
        os.close(mqueue("/victim"))
        _libc.mq_unlink(b"/victim")
        got["mqueue"] = "ok"
    except OSError as exc:
        got["mqueue"] = _ename(exc.errno)
    r, w = os.pipe()
    got["pipe_bytes"] = fcntl.fcntl(w, F_GETPIPE_SZ)
    os.close(r)
    os.close(w)
    return got


def run(ctx):
    role = ctx.parameters["role"]
    if role == "hog":
        return hog(ctx)
    if role == "victim":
        return victim(ctx)
    raise ValueError(f"unknown role {role!r}")
