"""Test protocol: fork many short-lived children while the runtime's heartbeat runs, as a worker pool would.

Each child exits at once without touching grpc; the protocol returns how many
it forked and reaped.
"""

import os
import time


def run(ctx):
    reaped = 0
    for _ in range(ctx.parameters.get("forks", 60)):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        reaped += os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.005)
    return {"reaped": reaped, "grpc_fork_support": os.environ.get("GRPC_ENABLE_FORK_SUPPORT")}
