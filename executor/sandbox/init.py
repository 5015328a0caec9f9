"""PID 1 of the sandbox: untraceable, tied to its parent, caps the output, reaps orphans.

Docker's own init (tini) runs as the sandbox's uid and stays dumpable, so
protocol code could ptrace it or read its memory through /proc/1/mem. This
init makes itself non-dumpable first, which puts it out of reach of an
unprivileged process of the same uid, then starts the runtime and waits. It
holds two duties that no protocol behaviour can undo, since they live in this
process and not in the runtime the protocol shares:

- *No sandbox outlives its parent.* Before the runtime starts, init connects to
  the parent's lifeline socket (``--lifeline``); the parent accepts that one
  connection and holds it for the task's life. When it reads end-of-file (the
  parent died or let go), init kills every process in the container and exits.
- *The output costs the sandbox, not the engine.* The runtime's stdout and
  stderr are pipes to init, which passes on at most :data:`OUTPUT_CAP_BYTES` of
  each to the container's log and drops the rest, keeping only its last
  :data:`OUTPUT_TAIL_BYTES` for the end (where the parent reads a crash's last
  words).

Usage: ``python3 -m executor.sandbox.init [--lifeline PATH] -- COMMAND [ARG ...]``
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading

from executor.sandbox.contract import EXIT_INIT_FAILED, EXIT_PARENT_GONE

PR_SET_DUMPABLE = 4
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
# What reaches the container's log of each of stdout and stderr at most, plus
# the last bytes of what was dropped and one note.
# Small enough that both streams' kept output fits the engine's 1 MiB log
# (executor.backends.docker.STDERR_LOG_MAX) with room for its JSON framing.
OUTPUT_CAP_BYTES = 256 * 1024
OUTPUT_TAIL_BYTES = 16 * 1024
# After the runtime exits, how long its output may take to drain.
DRAIN_S = 2.0
_READ_BYTES = 64 * 1024


def _write_all(fd: int, data: bytes) -> bool:
    """Write all of ``data``; ``False`` once ``fd`` refuses (the caller keeps draining)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError:
            return False
        view = view[n:]
    return True


def forward(
    src: int, dst: int, name: str, cap: int = OUTPUT_CAP_BYTES, tail_bytes: int = OUTPUT_TAIL_BYTES
) -> None:
    """Copy ``src`` to ``dst`` until end-of-file: the first ``cap`` bytes, then only the end.

    Reads everything, so the writer never blocks on a full pipe; what it drops
    costs only this process's CPU, inside the sandbox's cgroup.
    """
    sent = dropped = 0
    tail = b""
    writable = True
    while True:
        try:
            chunk = os.read(src, _READ_BYTES)
        except OSError:
            break
        if not chunk:
            break
        if sent < cap:
            part = chunk[: cap - sent]
            sent += len(part)
            writable = writable and _write_all(dst, part)
            chunk = chunk[len(part) :]
            if not chunk:
                continue
        if not dropped and writable:
            note = f"\n[sandbox init: {name} reached its cap of {cap} bytes; the rest is dropped]\n"
            writable = _write_all(dst, note.encode())
        dropped += len(chunk)
        tail = (tail + chunk[-tail_bytes:])[-tail_bytes:]
    if dropped and writable:
        newline = tail.find(b"\n")
        if dropped > len(tail) and 0 <= newline < len(tail) - 1:
            tail = tail[newline + 1 :]  # start the end on a whole line
        note = f"\n[sandbox init: {dropped} bytes of {name} dropped; their last {len(tail)} bytes follow]\n"
        _write_all(dst, note.encode() + tail)
    os.close(src)


def _kill_all(child: int) -> None:
    """Kill every process of the sandbox (as pid 1), or else just the runtime."""
    with contextlib.suppress(OSError):
        if os.getpid() == 1:
            # From pid 1 of a pid namespace: every other process in it.
            os.kill(-1, signal.SIGKILL)
        else:
            os.kill(child, signal.SIGKILL)


def hold_lifeline(sock: socket.socket, child: int) -> None:
    """Block until the parent's end of ``sock`` closes; then end the sandbox."""
    while True:
        try:
            data = sock.recv(64)
        except OSError:
            data = b""
        if not data:
            break
    _kill_all(child)
    _write_all(2, b"sandbox init: lost the parent; stopping the sandbox\n")
    os._exit(EXIT_PARENT_GONE)


def _connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


def _parse(argv: list[str]) -> tuple[str | None, list[str]]:
    lifeline = None
    while argv and argv[0] != "--":
        if argv[0] == "--lifeline" and len(argv) > 1:
            lifeline, argv = argv[1], argv[2:]
        else:
            break
    if argv[:1] == ["--"]:
        argv = argv[1:]
    return lifeline, argv


def main(argv: list[str]) -> int:
    """Run ``argv`` as the only child; return its exit status the way a shell does."""
    lifeline_path, argv = _parse(argv)
    if not argv:
        sys.stderr.write("sandbox init: no command\n")
        return EXIT_INIT_FAILED
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        # Fail closed: without this, protocol code could take over pid 1.
        sys.stderr.write(f"sandbox init: prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}\n")
        return EXIT_INIT_FAILED
    lifeline: socket.socket | None = None
    if lifeline_path is not None:
        try:
            # Before the runtime exists, so the one connection the parent
            # accepts is ours. Python's sockets are close-on-exec: the runtime
            # never holds it.
            lifeline = _connect(lifeline_path)
        except OSError as exc:
            # Fail closed: without it, the sandbox could outlive its parent.
            sys.stderr.write(f"sandbox init: cannot reach the parent's lifeline: {exc}\n")
            return EXIT_INIT_FAILED
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (out_r, out_w, err_r, err_w):
                os.close(fd)
            os.execvp(argv[0], argv)  # noqa: S606 (argv is the executor's fixed runtime command)
        finally:
            os._exit(EXIT_INIT_FAILED)
    os.close(out_w)
    os.close(err_w)
    forwarders = [
        threading.Thread(target=forward, args=(out_r, 1, "stdout"), name="stdout", daemon=True),
        threading.Thread(target=forward, args=(err_r, 2, "stderr"), name="stderr", daemon=True),
    ]
    for thread in forwarders:
        thread.start()
    if lifeline is not None:
        threading.Thread(target=hold_lifeline, args=(lifeline, child), name="lifeline", daemon=True).start()

    def forward_signal(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward_signal)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return EXIT_INIT_FAILED
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            break
    # The task is over: whatever the runtime left behind goes, and its output
    # (all writers now gone) drains to the log.
    if os.getpid() == 1:
        _kill_all(child)
    for thread in forwarders:
        thread.join(DRAIN_S)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
