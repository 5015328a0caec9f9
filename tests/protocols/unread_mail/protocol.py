"""Test protocol: send a lot of mail that nobody will read, then wait for a reply that cannot come."""

from executor.sandbox.context import MailboxError


def run(ctx):
    mb = ctx.mailbox
    body = b"u" * (ctx.parameters["mib"] * 1024 * 1024)
    for _ in range(ctx.parameters["count"]):
        mb.send_training_update(body)
    # One body large enough to travel through the parent's spool files.
    mb.send_training_update(b"v" * (ctx.parameters["big_mib"] * 1024 * 1024))
    try:
        mb.await_modeller_response(60)
        reply = ["no error"]
    except MailboxError as exc:
        reply = [type(exc).__name__, exc.code]
    return {"sent": ctx.parameters["count"] + 1, "reply": reply}
