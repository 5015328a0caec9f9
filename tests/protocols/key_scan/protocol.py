"""Test protocol: dump everything the sandbox can see that could hold a key.

The test, not this code, knows the key and searches the dump.
"""

import base64
import os

ROOTS = ["/run/sandbox", "/sandbox/protocol", "/data", "/tmp", "/opt/sandbox-executor/lib/executor"]
PROC = ["/proc/self/environ", "/proc/self/cmdline", "/proc/1/environ", "/proc/1/cmdline"]


def _files():
    for root in ROOTS:
        for dirpath, _, filenames in os.walk(root):
            for name in filenames:
                yield os.path.join(dirpath, name)
    yield from PROC


def run(ctx):
    from executor.v1 import sandbox_pb2 as pb

    client = ctx.mailbox._client
    config = client.stub.GetTask(pb.GetTaskRequest(), metadata=client.metadata, timeout=30)
    files = {}
    for path in _files():
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except OSError:
            continue
        files[path] = base64.b64encode(data).decode()
    return {
        "environ": dict(os.environ),
        "config": base64.b64encode(config.SerializeToString()).decode(),
        "files": files,
    }
