"""Test protocol: a large training update up, a large model down."""

import hashlib
import os


def run(ctx):
    size = ctx.parameters["mib"] * 1024 * 1024
    update = os.urandom(size)
    sent_digest = hashlib.sha256(update).hexdigest()
    ctx.mailbox.send_training_update(update)
    del update
    model = ctx.mailbox.await_algorithm_exchange(300)
    return {
        "sent_sha256": sent_digest,
        "received_size": len(model),
        "received_sha256": hashlib.sha256(model).hexdigest(),
    }
