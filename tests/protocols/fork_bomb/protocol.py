"""Test protocol: fork until the pids cap says no; children just wait.

The bomb runs in a fresh interpreter: forking the runtime process itself
(which has grpc threads) at the cap can hang or abort grpc, which would test
grpc rather than the cap.
"""

import json
import subprocess
import sys

BOMB = r"""
import json, os, signal, time
children, refused = [], ""
try:
    while len(children) < 100_000:
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        children.append(pid)
except OSError as exc:
    refused = type(exc).__name__
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
print(json.dumps({"children": len(children), "refused": refused}))
"""


def run(ctx):
    out = subprocess.run([sys.executable, "-c", BOMB], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"bomb exited {out.returncode}: {out.stderr[-500:]}")
    return json.loads(out.stdout)
