"""Test protocol: returns its parameter ``n`` at once (after ``sleep`` seconds, if given)."""

import time


def run(ctx):
    time.sleep(ctx.parameters.get("sleep", 0))
    return ctx.parameters.get("n")
