"""Test protocol: announce itself, then wait a long time for the modeller."""


def run(ctx):
    ctx.mailbox.send_task_start()
    return ctx.mailbox.await_modeller_response(ctx.parameters.get("timeout", 120)).decode()
