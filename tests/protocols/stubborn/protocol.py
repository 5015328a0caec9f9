"""Test protocol: ignore every request to stop."""

import time


def run(ctx):
    ctx.progress.run_start()
    while True:
        try:
            time.sleep(600)
        except BaseException:
            continue
