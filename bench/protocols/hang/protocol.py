"""Bench protocol: work a while, report the host-clock time as progress, then freeze the whole process.

SIGSTOP stops every thread, the heartbeat's included, as a hung interpreter
would. The delay before it (a parameter) puts the freeze at a random point
between two heartbeats.
"""

import os
import signal
import time


def run(ctx):
    time.sleep(float(ctx.parameters.get("delay", 0)))
    ctx.progress.step(1, 1, info=f"hang-at {time.time()!r}")
    os.kill(os.getpid(), signal.SIGSTOP)
    return "thawed"
