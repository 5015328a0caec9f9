"""Test protocol: fork until the pids cap says no; children just wait."""

import os
import time


def run(ctx):
    children = 0
    refused = ""
    try:
        while children < 100_000:
            pid = os.fork()
            if pid == 0:
                time.sleep(120)
                os._exit(0)
            children += 1
    except OSError as exc:
        refused = type(exc).__name__
    return {"children": children, "refused": refused}
