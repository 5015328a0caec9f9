"""Bench protocol: a little CPU work and a few mailbox round trips, like a small training round."""

import json


def run(ctx):
    rounds = int(ctx.parameters.get("rounds", 3))
    work = int(ctx.parameters.get("work", 1_000_000))
    ctx.progress.run_start()
    acc = 0
    for r in range(rounds):
        acc = (acc + sum(i * i % 7 for i in range(work // rounds))) % 1_000_003
        ctx.mailbox.send_training_update(json.dumps({"round": r, "acc": acc}).encode())
        ctx.mailbox.await_modeller_response(120)
        ctx.progress.step(r + 1, rounds)
    ctx.progress.run_end()
    return {"acc": acc, "rounds": rounds}
