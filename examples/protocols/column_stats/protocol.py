"""Example protocol: summary statistics of numeric columns across a pod's CSV files.

It reads the files the pod let it see (read-only), reports one progress step
and one processed file per file, saves one result row per column in the pod's
project database (``ctx.save_results``), sends its summary to the modeller as
a TRAINING_UPDATE through the proxy mailbox, and returns the same summary as
the task's result. Only aggregates leave the pod.
"""

import csv
import json
import math


def run(ctx):
    columns = ctx.parameters.get("columns") or []
    files = sorted(p for p in ctx.data_dir.iterdir() if p.suffix == ".csv")
    if not files:
        ctx.abort(f"no CSV files in datasource {ctx.datasource_name!r}", reason="NoData")

    stats = {c: {"count": 0, "sum": 0.0, "sumsq": 0.0, "min": math.inf, "max": -math.inf} for c in columns}
    rows = 0
    ctx.progress.run_start()
    for i, path in enumerate(files, start=1):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                rows += 1
                for column in columns:
                    value = row.get(column, "")
                    if value == "":
                        continue
                    x = float(value)
                    s = stats[column]
                    s["count"] += 1
                    s["sum"] += x
                    s["sumsq"] += x * x
                    s["min"] = min(s["min"], x)
                    s["max"] = max(s["max"], x)
        ctx.progress.step(i, len(files), info=path.name)
        ctx.file_processed(path.name)
    ctx.progress.run_end()

    summary = {"files": len(files), "rows": rows, "columns": {}}
    for column, s in stats.items():
        n = s["count"]
        mean = s["sum"] / n if n else None
        var = s["sumsq"] / n - mean * mean if n else None
        summary["columns"][column] = {
            "count": n,
            "mean": round(mean, 4) if n else None,
            "std": round(math.sqrt(max(var, 0.0)), 4) if n else None,
            "min": s["min"] if n else None,
            "max": s["max"] if n else None,
        }
    if summary["columns"]:
        ctx.save_results([{"column": column, **values} for column, values in summary["columns"].items()])
    ctx.mailbox.send("TRAINING_UPDATE", json.dumps(summary).encode())
    return summary
