"""Test protocol: freeze the whole sandbox process, heartbeat thread included."""

import os
import signal


def run(ctx):
    ctx.progress.run_start()
    os.kill(os.getpid(), signal.SIGSTOP)
    return "thawed"
