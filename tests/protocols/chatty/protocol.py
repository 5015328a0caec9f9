"""Test protocol: report progress far faster than the parent's per-task call rate.

Returns how many progress calls it made and how many times the parent's rate
cap refused one (each refusal is retried after a back-off).
"""

import threading


def run(ctx):
    n = ctx.parameters["steps"]

    def report():
        for i in range(n):
            ctx.progress.step(i + 1, n)

    threads = [threading.Thread(target=report) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"calls": 3 * n, "refused": ctx.progress._client.rate_limited}
