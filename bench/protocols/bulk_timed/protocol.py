"""Bench protocol: a large training update up, a large model down, with host-clock timestamps.

Hashing happens outside the timed windows, so the windows hold only the transfer.
"""

import hashlib
import os
import time


def run(ctx):
    size = int(ctx.parameters["mib"]) * 1024 * 1024
    verify = bool(ctx.parameters.get("verify", True))
    update = os.urandom(size)
    sent_sha256 = hashlib.sha256(update).hexdigest() if verify else ""
    send_start = time.time()
    ctx.mailbox.send_training_update(update)
    send_end = time.time()
    del update
    model = ctx.mailbox.await_algorithm_exchange(600)
    received = time.time()
    return {
        "send_start": send_start,
        "send_end": send_end,
        "received": received,
        "sent_sha256": sent_sha256,
        "received_size": len(model),
        "received_sha256": hashlib.sha256(model).hexdigest() if verify else "",
    }
