"""Test protocol: return a result far larger than the cap."""


def run(ctx):
    return "x" * (ctx.parameters.get("mib", 8) * 1024 * 1024)
