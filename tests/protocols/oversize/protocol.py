"""Test protocol: send and fetch too much, politely and by lying; then carry on."""

from executor.sandbox.context import MailboxError
from executor.v1 import sandbox_pb2 as pb


def _lying_chunks(declared, actual):
    yield pb.MessageChunk(type=pb.TRAINING_UPDATE, total_size=declared, data=b"x" * min(actual, 1 << 20))
    sent = min(actual, 1 << 20)
    while sent < actual:
        n = min(actual - sent, 1 << 20)
        yield pb.MessageChunk(data=b"x" * n)
        sent += n


def run(ctx):
    mb = ctx.mailbox
    limit = mb.max_message_bytes
    out = {"limit": limit}
    try:
        mb.send_training_update(b"x" * (limit + 1))
    except MailboxError as exc:
        out["polite"] = [exc.code, str(exc)]
    # Bypass the runtime's own check: the parent must refuse by itself.
    client = mb._client
    for name, declared, actual in [
        ("declared_too_big", limit + 1, 1),
        ("longer_than_declared", 1024, 3 * 1024 * 1024),
        ("shorter_than_declared", 4096, 10),
    ]:
        try:
            client.stub.SendMessage(_lying_chunks(declared, actual), metadata=client.metadata, timeout=60)
            out[name] = ["accepted", ""]
        except Exception as exc:
            out[name] = [exc.code().name, exc.details()]
    try:
        mb.await_modeller_response(30)
    except MailboxError as exc:
        out["incoming_too_big"] = [exc.code, str(exc)]
    mb.send_training_update(b"still here")
    return out
