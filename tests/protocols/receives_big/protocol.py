"""Test protocol: receive one large model and say how much the sandbox's peak memory grew.

The peak (``ru_maxrss``) is read just before the receive and just after, with
the body still held, so the growth is what receiving it cost.
"""

import hashlib
import resource


def _peak_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(ctx):
    before = _peak_mib()
    model = ctx.mailbox.await_algorithm_exchange(120)
    after = _peak_mib()
    return {
        "size": len(model),
        "is_bytes": type(model) is bytes,
        "sha256": hashlib.sha256(model).hexdigest(),
        "peak_growth_mib": after - before,
    }
