"""Test protocol: what a task finds in its sandbox, to tell a fresh one from a reused one.

It looks for a marker an earlier task in the same container would have left
in /tmp, then leaves its own; it reports which modules were imported before
it ran (``preload``), its uid, what /data holds and the protocol's own files.
"""

import os
import sys
import time


def run(ctx):
    first_line = time.time()
    marker = "/tmp/warm-probe-was-here"
    earlier = os.path.exists(marker)
    with open(marker, "w") as f:
        f.write(ctx.task_id)
    data = []
    for root, _, files in os.walk("/data"):
        data.extend(os.path.relpath(os.path.join(root, name), "/data") for name in files)
    contents = {}
    for name in sorted(data):
        with open(os.path.join("/data", name)) as f:
            contents[name] = f.read()
    return {
        "first_line": first_line,
        "earlier_task": earlier,
        "preloaded": [m for m in ctx.parameters.get("modules", []) if m in sys.modules],
        "uid": os.getuid(),
        "data": contents,
        "protocol_files": sorted(os.listdir("/sandbox/protocol")),
        "sleep": time.sleep(ctx.parameters.get("sleep", 0)),
    }
