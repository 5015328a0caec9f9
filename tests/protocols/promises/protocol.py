"""Test protocol: report what the sandbox sees, for the README's promises, by ``mode``."""

import errno
import os
import shutil
import subprocess
from pathlib import Path


def _read(path):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def _mount_options(target):
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == target:
            return {"fstype": fields[2], "options": fields[3].split(",")}
    return None


def _cgroup_files():
    # cgroup v2 names first, then v1's.
    names = {
        "cpu.max": ["/sys/fs/cgroup/cpu.max"],
        "cfs_quota_us": [f"/sys/fs/cgroup/{d}/cpu.cfs_quota_us" for d in ("cpu", "cpu,cpuacct")],
        "cfs_period_us": [f"/sys/fs/cgroup/{d}/cpu.cfs_period_us" for d in ("cpu", "cpu,cpuacct")],
        "memory.max": ["/sys/fs/cgroup/memory.max"],
        "memory.swap.max": ["/sys/fs/cgroup/memory.swap.max"],
        "memory.limit_in_bytes": ["/sys/fs/cgroup/memory/memory.limit_in_bytes"],
        "memory.memsw.limit_in_bytes": ["/sys/fs/cgroup/memory/memory.memsw.limit_in_bytes"],
    }
    out = {}
    for key, paths in names.items():
        for path in paths:
            value = _read(path)
            if value is not None:
                out[key] = value
                break
    return out


def _scratch(ctx):
    scratch = ctx.scratch_dir
    note = scratch / "note.txt"
    note.write_text("written")
    tool = scratch / "tool"
    shutil.copy("/bin/true", tool)
    tool.chmod(0o755)
    try:
        subprocess.run([str(tool)], check=True)
        executed = "ran"
    except OSError as exc:
        executed = errno.errorcode.get(exc.errno, str(exc.errno))
    mount = None
    # The scratch directory's filesystem: the longest mount point above it.
    best = ""
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        target = fields[1]
        if str(scratch).startswith(target.rstrip("/") + "/") and len(target) > len(best):
            best, mount = target, {"fstype": fields[2], "options": fields[3].split(",")}
    return {"path": str(scratch), "written": note.read_text(), "executed": executed, "mount": mount}


def _secret_in_processes():
    token = _read("/run/sandbox/token")
    if not token:
        return {"token_read": False}
    seen = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for what in ("cmdline", "environ"):
            try:
                blob = Path(f"/proc/{pid}/{what}").read_bytes()
            except OSError:
                continue
            if token.encode() in blob:
                seen.append(f"{pid}/{what}")
    return {"token_read": True, "seen_in": seen}


def run(ctx):
    mode = ctx.parameters.get("mode", "inspect")
    if mode == "symlink":
        try:
            os.symlink("/data", ctx.scratch_dir / "link")
            return {"symlink": "made"}
        except OSError as exc:
            return {"symlink": errno.errorcode.get(exc.errno, str(exc.errno))}
    if mode == "send":
        from executor.sandbox.context import MailboxError

        sent = []
        for size in ctx.parameters["sizes"]:
            try:
                ctx.mailbox.send_training_update(b"u" * size)
                sent.append("sent")
            except MailboxError as exc:
                sent.append(exc.code)
        return {"sent": sent}
    if mode == "result":
        return "x" * ctx.parameters["bytes"]
    if mode == "ready":
        return {"ready": ctx.mailbox.wait_for_modeller(ctx.parameters.get("timeout", 3))}
    if mode == "get_shares":
        from executor.sandbox.context import MailboxError

        try:
            got = ctx.mailbox.get_secure_shares(ctx.parameters.get("timeout", 30))
        except MailboxError as exc:
            return {"error": exc.code}
        return {pod: share.decode() for pod, share in sorted(got.items())}
    # "inspect": identity, mounts, cgroup caps, scratch, files, epochs.
    ctx.progress.run_start()
    for epoch in (1, 2):
        ctx.progress.epoch_start(epoch, 2)
        for step in (1, 2):
            ctx.progress.step(step, 2, info=f"batch {step}", epoch=epoch, max_epochs=2)
        ctx.progress.epoch_end(epoch, 2)
    ctx.file_processed("good.csv")
    ctx.file_failed("bad.csv", "unparsable row 3")
    report = {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "modeller_name": ctx.modeller_name,
        "tmp": _mount_options("/tmp"),
        "cgroup": _cgroup_files(),
        "scratch": _scratch(ctx),
        "token": _secret_in_processes(),
    }
    ctx.progress.run_end()
    return report
