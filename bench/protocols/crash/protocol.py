"""Bench protocol: write the host-clock time to stderr, then vanish as crashing code does."""

import os
import sys
import time


def run(ctx):
    sys.stderr.write(f"crash-at {time.time()!r}\n")
    sys.stderr.flush()
    os._exit(3)
