"""Test protocol: freeze the whole sandbox (heartbeat thread included) as run() starts."""

import os
import signal


def run(ctx):
    os.kill(os.getpid(), signal.SIGSTOP)
    return "thawed"
