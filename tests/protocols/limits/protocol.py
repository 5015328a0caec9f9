"""Test protocol: push one policy key's limit from inside the sandbox, and say what happened.

``mode`` picks what it does:

- ``burn``: ``procs`` processes spin for ``seconds`` of wall time each (CPU
  quota and CPU-time limits are judged from outside, by the host's cgroup);
- ``write``: write ``bytes`` bytes to a file in /tmp, one byte at a time past
  ``quiet`` bytes, and return how far it got and the error (or raise it, with
  ``raise``);
- ``sleep``: sleep ``seconds`` and return;
- ``stuck``: beat on but never report progress;
- ``result``: return a string of ``bytes`` characters;
- ``send``: send a training update of ``bytes`` bytes and return;
- ``imports``: import ``module`` and return its version.
"""

import errno
import importlib
import multiprocessing
import os
import threading
import time


def _spin(seconds):
    end = time.monotonic() + seconds
    n = 0
    while time.monotonic() < end:
        n += 1


def run(ctx):
    p = ctx.parameters
    mode = p["mode"]
    ctx.progress.run_start()
    if mode == "burn":
        procs = [
            multiprocessing.get_context("fork").Process(target=_spin, args=(p["seconds"],))
            for _ in range(p.get("procs", 1))
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        ctx.progress.run_end()
        return {"exit_codes": [proc.exitcode for proc in procs]}
    if mode == "write":
        path = os.path.join(str(ctx.scratch_dir), "big.bin")
        written = 0
        try:
            with open(path, "wb", buffering=0) as f:
                while written < p["bytes"]:
                    written += f.write(b"x")
        except OSError as exc:
            if p.get("raise"):
                raise
            return {"written": written, "error": errno.errorcode.get(exc.errno, str(exc.errno))}
        return {"written": written, "error": ""}
    if mode == "sleep":
        time.sleep(p["seconds"])
        return "slept"
    if mode == "stuck":
        threading.Event().wait()
    if mode == "result":
        return "x" * p["bytes"]
    if mode == "send":
        ctx.mailbox.send_training_update(b"u" * p["bytes"])
        return "sent"
    if mode == "imports":
        module = importlib.import_module(p["module"])
        return getattr(module, "__version__", "?")
    raise ValueError(f"unknown mode {mode!r}")
