"""Test protocol: fork until the pids cap says no; children just wait.

The bomb runs in a fresh interpreter: forking the runtime process itself
(which has grpc threads) at the cap can hang or abort grpc, which would test
grpc rather than the cap.

Parameters: ``limit`` (children at most, default 100,000) and ``report``: when
true, the bomb waits after each fork until ``run`` has reported the count as
progress (``epoch_start(children, limit)``: a boundary, which is never
coalesced the way steps are), and once more after a refused fork
(``epoch_end(children, limit)``) before it kills its children. Progress calls
are answered only after the parent's listener ran, so the parent can look at
the container's pids cgroup at each count while the children are alive, and
knows how far the bomb got even when the cap ends the whole sandbox (gVisor)
instead of refusing fork().
"""

import json
import subprocess
import sys

BOMB = r"""
import json, os, signal, sys, time
limit, report = int(sys.argv[1]), sys.argv[2] == "1"
children, refused = [], ""
try:
    while len(children) < limit:
        pid = os.fork()
        if pid == 0:
            time.sleep(120)
            os._exit(0)
        children.append(pid)
        if report:
            print(len(children), flush=True)
            if not sys.stdin.readline():  # the protocol's go-ahead
                break
except OSError as exc:
    refused = type(exc).__name__
    if report:
        print(f"{len(children)} refused", flush=True)
        sys.stdin.readline()
for pid in children:
    os.kill(pid, signal.SIGKILL)
for pid in children:
    os.waitpid(pid, 0)
print(json.dumps({"children": len(children), "refused": refused}), flush=True)
"""


def run(ctx):
    limit = int(ctx.parameters.get("limit", 100_000))
    report = bool(ctx.parameters.get("report", False))
    proc = subprocess.Popen(
        [sys.executable, "-c", BOMB, str(limit), "1" if report else "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    last = ""
    for line in proc.stdout:
        last = line
        words = line.split()
        if report and words and words[0].isdigit():
            if len(words) > 1:  # "N refused"
                ctx.progress.epoch_end(int(words[0]), limit)
            else:
                ctx.progress.epoch_start(int(words[0]), limit)
            proc.stdin.write("go\n")
            proc.stdin.flush()
    proc.stdin.close()
    err = proc.stderr.read()
    if proc.wait(timeout=120) != 0:
        raise RuntimeError(f"bomb exited {proc.returncode}: {err[-500:]}")
    return json.loads(last)
