"""Test protocol: an async run(ctx)."""

import asyncio


async def run(ctx):
    await asyncio.sleep(0.01)
    return {"async": True, "n": ctx.parameters["n"] * 2}
