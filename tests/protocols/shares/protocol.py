"""Test protocol: swap secure-aggregation shares with the other pods."""


def run(ctx):
    peers = [p for p in ctx.pod_identifiers if p != ctx.pod_identifier]
    ctx.mailbox.send_secure_shares({p: f"{ctx.pod_identifier}->{p}".encode() for p in peers})
    got = ctx.mailbox.get_secure_shares(30)
    return {pod: share.decode() for pod, share in sorted(got.items())}
