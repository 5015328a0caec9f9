"""Test protocol: alive (its heartbeat runs) but stuck: blocked forever, no progress."""

import threading


def run(ctx):
    ctx.progress.run_start()
    threading.Event().wait()
