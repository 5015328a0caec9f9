"""Bench protocol: return the host-clock time of its first line, and nothing else."""

import time


def run(ctx):
    first = time.time()
    return first
