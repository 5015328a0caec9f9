"""Test protocol: abort on purpose."""


def run(ctx):
    ctx.abort("not enough records to train", reason="InsufficientData")
