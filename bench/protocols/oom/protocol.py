"""Bench protocol: allocate and touch memory until the sandbox's cap ends it.

Each step writes the host-clock time to stderr first, so the last line seen is
within one step of the kill.
"""

import sys
import time

STEP = 4 * 1024 * 1024
PAGE = 4096


def run(ctx):
    hoard = []
    for i in range(100_000):
        sys.stderr.write(f"oom-step {time.time()!r} {i * STEP >> 20}\n")
        sys.stderr.flush()
        block = bytearray(STEP)
        block[::PAGE] = b"\x01" * (STEP // PAGE)
        hoard.append(block)
    return len(hoard)
