"""Bench protocol: announce itself, then answer each MODELLER_RESPONSE with a TRAINING_UPDATE.

The parent's modeller times each round trip. A call the parent throttles (its
per-task call-rate limit) is retried after a short pause and counted.
"""

import time

from executor.sandbox.context import MailboxError


def _retrying(call, counter):
    while True:
        try:
            return call()
        except MailboxError as exc:
            if exc.code != "RESOURCE_EXHAUSTED":
                raise
            counter[0] += 1
            time.sleep(0.005)


def run(ctx):
    rounds = int(ctx.parameters["rounds"])
    payload = b"\x5a" * int(ctx.parameters["size"])
    mb = ctx.mailbox
    throttled = [0]
    mb.send_task_start()
    for _ in range(rounds):
        _retrying(lambda: mb.receive("MODELLER_RESPONSE", 60), throttled)
        _retrying(lambda: mb.send("TRAINING_UPDATE", payload), throttled)
    return {"rounds": rounds, "throttled": throttled[0]}
