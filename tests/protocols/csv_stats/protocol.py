"""Test protocol: statistics over the CSV files of its data view, as a pod would compute them.

For each ``*.csv`` file it can see: a well-formed file (header ``id,value``,
integer values) gives one result row and is reported processed; a malformed
one is reported failed with the reason. It returns the names it could see.

Parameters:
    probe: file names to try to open in the data view; the result says which
        could be read (files outside the task's selection must not be).
    die_on: a file name; if it is in this batch's view the sandbox kills
        itself (SIGKILL) before reporting, as a crash in the middle of a run.
    hang_on: a file name; if it is in this batch's view the protocol sleeps
        (beating, until the policy's wall clock), for a parent to be killed.
    flood_mb: MiB to print to stdout first, as a chatty protocol would.
    log: a message to log at INFO through ``logging``.
"""

import logging
import os
import signal
import time


def _visible(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def _stats(path):
    lines = path.read_text().splitlines()
    if not lines or lines[0] != "id,value":
        raise ValueError("missing header id,value")
    total = 0
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split(",")
        if len(fields) != 2:
            raise ValueError(f"row {number} has {len(fields)} fields")
        try:
            total += int(fields[1])
        except ValueError:
            raise ValueError(f"row {number}: {fields[1]!r} is not a whole number") from None
    return len(lines) - 1, total


def run(ctx):
    params = ctx.parameters
    if params.get("log"):
        logging.getLogger("csv_stats").info(params["log"])
    block = b"y" * 1023 + b"\n"
    for _ in range(params.get("flood_mb", 0) * 1024):
        os.write(1, block)
    seen = _visible(ctx.data_dir)
    if params.get("die_on") in seen:
        os.kill(os.getpid(), signal.SIGKILL)
    if params.get("hang_on") in seen:
        ctx.progress.step(0, 0, info="hanging")
        time.sleep(3600)
    probes = {}
    for name in params.get("probe", []):
        try:
            (ctx.data_dir / name).read_bytes()
            probes[name] = "read"
        except OSError as exc:
            probes[name] = type(exc).__name__
    ctx.progress.run_start()
    csvs = [name for name in seen if name.endswith(".csv")]
    for epoch in (1, 2):
        ctx.progress.epoch_start(epoch, 2)
        ctx.progress.step(epoch, 2, info=f"epoch {epoch}", epoch=epoch, max_epochs=2)
        ctx.progress.epoch_end(epoch, 2)
    rows = []
    for name in csvs:
        try:
            count, total = _stats(ctx.data_dir / name)
        except (ValueError, UnicodeDecodeError) as exc:
            ctx.file_failed(name, str(exc))
            continue
        rows.append({"file": name, "rows": count, "total": total})
        ctx.file_processed(name)
    if rows:
        ctx.save_results(rows)
    ctx.progress.run_end()
    return {"seen": seen, "probes": probes}
