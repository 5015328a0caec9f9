"""Test protocol: call the parent far faster than its per-task call rate.

Three threads each send ``steps`` tiny mailbox messages (with no modeller
attached, the parent discards and counts them). Returns how many calls it
made and how many times the parent's rate cap refused one (each refusal is
retried after a back-off). Progress steps would not do: they are coalesced in
the sandbox and have a budget of their own.
"""

import threading


def run(ctx):
    n = ctx.parameters["steps"]

    def chat():
        for _ in range(n):
            ctx.mailbox.send_training_update(b"x")

    threads = [threading.Thread(target=chat) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"calls": 3 * n, "refused": ctx.mailbox._client.rate_limited}
