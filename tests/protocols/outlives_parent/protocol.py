"""Test protocol: try to outlive the parent, then sleep far past any test's patience.

``mode`` is ``close_stderr`` (the runtime's farewell write then fails) or
``defiant`` (also blocks and ignores signals and disarms ``os._exit``, so the
runtime cannot end itself however it tries).
"""

import os
import signal
import sys
import time


def run(ctx):
    mode = ctx.parameters["mode"]
    ctx.progress.run_start()
    sys.stderr.close()
    os.close(2)
    if mode == "defiant":
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.Signals) - {signal.SIGKILL, signal.SIGSTOP})
        os._exit = lambda code: None
        sys.exit = lambda code=0: None
    while True:
        time.sleep(600)
