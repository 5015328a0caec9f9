"""Test protocol: report the granted secrets and the kernel the sandbox runs on."""

import os


def run(ctx):
    with open("/proc/version") as f:
        kernel = f.read().strip()
    return {
        "secrets": ctx.secrets,
        "env_has_secret": any("granted-value" in v for v in os.environ.values()),
        "kernel": kernel,
        "memory_limit": ctx.parameters.get("x", 0),
    }
