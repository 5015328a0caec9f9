"""Test protocol: say it started, then sleep far past any test's patience."""

import time


def run(ctx):
    ctx.progress.run_start()
    time.sleep(ctx.parameters.get("seconds", 600))
    return "woke up"
