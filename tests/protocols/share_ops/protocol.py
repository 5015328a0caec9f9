"""Test protocol: send secure shares, fetch them, or send them until the parent refuses."""

from executor.sandbox.context import MailboxError

MAX_CALLS = 1000  # far past any cap, so a missing cap ends the loop rather than the test


def run(ctx):
    p = ctx.parameters
    mb = ctx.mailbox
    peers = [q for q in ctx.pod_identifiers if q != ctx.pod_identifier]
    if p.get("fill"):
        mb.send_training_update(b"f" * p["fill"])
    if p["mode"] == "send":
        mb.send_secure_shares({q: f"{ctx.task_id} {ctx.pod_identifier}->{q}".encode() for q in peers})
        return {"sent": len(peers)}
    if p["mode"] == "get":
        try:
            got = mb.get_secure_shares(p["timeout"])
        except MailboxError as exc:
            return {"error": [type(exc).__name__, exc.code]}
        return {"got": {pod: share.decode() for pod, share in sorted(got.items())}}
    batch = peers[: p["batch"]]
    sent = 0
    for _ in range(MAX_CALLS):
        try:
            mb.send_secure_shares({q: b"s" for q in batch})
        except MailboxError as exc:
            return {"sent": sent, "refused": exc.code}
        sent += len(batch)
    return {"sent": sent, "refused": ""}
