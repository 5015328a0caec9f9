"""Test protocol: echo the task, use the mailbox, report progress."""

import json


def run(ctx):
    ctx.progress.run_start()
    reply = ctx.mailbox.receive("MODELLER_RESPONSE", timeout=10)
    ctx.mailbox.send("TRAINING_UPDATE", b"update:" + reply)
    for i in range(1, 4):
        ctx.progress.step(i, 3, info=f"step {i}")
    ctx.progress.run_end()
    files = sorted(p.name for p in ctx.data_dir.iterdir())
    return {
        "task_id": ctx.task_id,
        "project_id": ctx.project_id,
        "parameters": ctx.parameters,
        "files": files,
        "reply": reply.decode(),
        "flags": {"test_run": ctx.flags.test_run},
        "schema": ctx.schema,
        "data": json.loads(json.dumps((ctx.data_dir / "records.csv").read_text())),
    }
