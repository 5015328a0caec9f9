"""Test protocol: return something that is not JSON."""


def run(ctx):
    return {"a set": {1, 2, 3}}
