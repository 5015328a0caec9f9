"""Test protocol: what the task's data view lets the sandbox see and do.

Returns every file it can find under the data path with its content, the
mounts at or under it, and the errno of each attempt to change a file (write,
truncate, chmod, utime, unlink, rename, link): a view of hard links shares its
inodes with the operator's data, so none may succeed.
"""

import errno
import os
from pathlib import Path


def _errno(call):
    try:
        call()
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))
    return "allowed"


def run(ctx):
    root = Path(ctx.data_dir)
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            files[str(path.relative_to(root))] = path.read_text()
    mounts = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        point = fields[1].replace("\\072", ":")
        if point == str(root) or point.startswith(f"{root}/"):
            mounts.append([point, "ro" in fields[3].split(",")])
    attempts = {}
    if files:
        target = root / sorted(files)[0]
        attempts = {
            "write": _errno(lambda: open(target, "a").close()),
            "truncate": _errno(lambda: os.truncate(target, 0)),
            "chmod": _errno(lambda: os.chmod(target, 0o777)),
            "utime": _errno(lambda: os.utime(target, (0, 0))),
            "unlink": _errno(lambda: os.unlink(target)),
            "rename": _errno(lambda: os.rename(target, root / "renamed")),
            "link": _errno(lambda: os.link(target, root / "linked")),
            "create": _errno(lambda: open(root / "new.csv", "w").close()),
        }
    for name in files:
        ctx.file_processed(name)
    # Names of the datasource that are not in this view are refused by the parent.
    refused = {}
    for name in ctx.parameters.get("report_outside", []):
        from executor.sandbox.context import ReportRefused

        try:
            ctx.file_processed(name)
            refused[name] = "accepted"
        except ReportRefused as exc:
            refused[name] = exc.code
    return {"files": files, "mounts": sorted(mounts), "attempts": attempts, "refused": refused}
