"""PID 1 of the sandbox: untraceable, reaps orphans, forwards signals, exits with the runtime.

Docker's own init (tini) runs as the sandbox's uid and stays dumpable, so
protocol code could ptrace it or read its memory through /proc/1/mem. This
init makes itself non-dumpable first, which puts it out of reach of an
unprivileged process of the same uid, then starts the runtime and waits.

Usage: ``python3 -m executor.sandbox.init -- COMMAND [ARG ...]``
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_DUMPABLE = 4
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
EXIT_INIT_FAILED = 70


def main(argv: list[str]) -> int:
    """Run ``argv`` as the only child; return its exit status the way a shell does."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        sys.stderr.write("sandbox init: no command\n")
        return EXIT_INIT_FAILED
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        # Fail closed: without this, protocol code could take over pid 1.
        sys.stderr.write(f"sandbox init: prctl(PR_SET_DUMPABLE) failed: {os.strerror(ctypes.get_errno())}\n")
        return EXIT_INIT_FAILED
    child = os.fork()
    if child == 0:
        try:
            os.execvp(argv[0], argv)  # noqa: S606 (argv is the executor's fixed runtime command)
        finally:
            os._exit(EXIT_INIT_FAILED)

    def forward(signum: int, frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    for signum in FORWARDED:
        signal.signal(signum, forward)
    while True:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            return EXIT_INIT_FAILED
        if pid == child:
            code = os.waitstatus_to_exitcode(status)
            return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
