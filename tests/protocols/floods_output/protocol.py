"""Test protocol: write far more to stdout and stderr than the log may hold, then end.

Parameters: ``stdout_mb``, ``stderr_mb`` (MiB to write), ``exit_code`` (if set,
leave with it before reporting a result, after writing ``last words``).
"""

import os
import sys

LINE = b"x" * 1023 + b"\n"


def run(ctx):
    block = LINE * 1024
    for _ in range(ctx.parameters.get("stdout_mb", 0)):
        os.write(1, block)
    for _ in range(ctx.parameters.get("stderr_mb", 0)):
        os.write(2, block)
    if "exit_code" in ctx.parameters:
        sys.stderr.write("last words\n")
        sys.stderr.flush()
        os._exit(ctx.parameters["exit_code"])
    return "flooded"
