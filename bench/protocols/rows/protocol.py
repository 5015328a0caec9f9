"""Bench protocol: save ``mib`` MiB of result rows (their compact JSON) of about ``row_bytes`` each.

Rows have one long string column, or ``columns`` small integer columns (a
wide row costs the most once parsed). Each call's rows are made fresh, as a
protocol that computes them would, and dropped once saved, so the sandbox
never holds more than one call of them.
"""

import json


def make_row(index, row_bytes, columns):
    """A row of about ``row_bytes`` of compact JSON: one padded string, or ``columns`` integers."""
    if columns > 1:
        return {f"c{k}": index for k in range(columns)}
    return {"i": index, "file": f"f{index % 997}.csv", "pad": "x" * max(1, row_bytes - 40)}


def run(ctx):
    row_bytes = int(ctx.parameters.get("row_bytes", 1024))
    columns = int(ctx.parameters.get("columns", 1))
    total = int(float(ctx.parameters.get("mib", 32)) * 1024 * 1024)
    saved = rows = 0
    while True:
        chunk = []
        size_of_call = 0
        while len(chunk) < 1000:
            row = make_row(rows, row_bytes, columns)
            size = len(json.dumps(row, separators=(",", ":")))  # as ctx sends it
            if saved + size > total or size_of_call + size > 1024 * 1024:
                break
            chunk.append(row)
            saved += size
            size_of_call += size
            rows += 1
        if not chunk:
            return {"rows": rows, "bytes": saved}
        ctx.save_results(chunk)
