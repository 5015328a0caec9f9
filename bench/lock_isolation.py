"""What keeping a task's locks and watches off the operator's inode costs: the seccomp profile, and views.

Issue 17's ways to keep a lock or a watch taken inside the sandbox from
reaching the operator's files, each against its baseline in the same run:

1. **The executor's seccomp profile** (``executor/policy/seccomp.py``, which refuses
   flock, fcntl locks, leases, dnotify, inotify and io_uring) against Docker's
   own default profile, under runc: cold start to the protocol's first line
   through the executor (the baseline strips the profile from the engine
   arguments, so the engine applies its default), interleaved round by round;
   and the cost per system call inside a container (``docker run``, the
   profile as a file against none): 200,000 ``fcntl(F_GETFL)`` (the
   profile's longest path, one comparison per allowed command) and 200,000
   ``getppid``, timed inside.
2. **A view that shares no inode** (copies) against the executor's hard links
   and read-only bind mounts, for ``--sets`` of N files of a size: the time
   to make the view (links, or copies, or, for bind mounts, what N more
   mounts add to a ``docker run`` of the hard-link view's single directory
   mount, which is where their cost falls), and the bytes each writes (from
   ``/proc/self/io``). A copy is timed to the page cache and again until
   every copy is on disk (fsync).

    .venv/bin/python bench/lock_isolation.py [--runs 10] [--view-runs 3]
        [--sets 100x64k,1000x64k,100x4m] [--json]

``--sets 1000x4m`` writes 4 GiB per copy run (about two minutes on the
development machine's disk).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from typing import TYPE_CHECKING, Any

import _common as c

if TYPE_CHECKING:
    from pathlib import Path

SYSCALL_LOOP = (
    "import fcntl, os, time\n"
    "n = 200000\n"
    "t = time.perf_counter()\n"
    "for _ in range(n): fcntl.fcntl(0, fcntl.F_GETFL)\n"
    "f = time.perf_counter() - t\n"
    "t = time.perf_counter()\n"
    "for _ in range(n): os.getppid()\n"
    "g = time.perf_counter() - t\n"
    "print(f / n * 1e9, g / n * 1e9)\n"
)
SIZES = {"k": 1024, "m": 1024 * 1024}


# -- 1. the profile ---------------------------------------------------------------------
class EngineDefault:
    """A switch that makes the Docker backend leave the seccomp profile to the engine (the baseline)."""

    def __init__(self) -> None:
        import executor.backends.docker as docker_backend

        self.on = False
        original = docker_backend.container_kwargs

        def kwargs(spec: Any) -> dict[str, Any]:
            out = original(spec)
            if self.on:
                out["security_opt"] = [o for o in out["security_opt"] if not o.startswith("seccomp=")]
            return out

        docker_backend.container_kwargs = kwargs


def first_line(ws: c.Workspace, executor: Any) -> dict[str, float]:
    """One first_line task: submit to its first line, and submit to ``Executor.run`` returning."""
    from executor.spec import TaskSpec

    spec = TaskSpec(
        protocol_dir=c.PROTOCOLS / "first_line", data_dir=ws.data_dir(), task_id=c.new_task_id("seccomp")
    )
    handle = ws.run(executor, spec, timeout=300)
    c.check_ok(handle.outcome, "first_line task")
    return {
        "first_line": float(handle.outcome.result) - handle.submitted,
        "end_to_end": handle.returned - handle.submitted,
    }


def per_call(ws: c.Workspace, profile: Path | None, image: str) -> tuple[float, float]:
    """Nanoseconds per fcntl(F_GETFL) and per getppid in a runc container under ``profile`` (None: Docker)."""
    key, value = ws.label
    argv = ["docker", "run", "--rm", "--network", "none", "--cap-drop", "ALL", "--label", f"{key}={value}"]
    argv += ["--security-opt", "no-new-privileges"]
    if profile is not None:
        argv += ["--security-opt", f"seccomp={profile}"]
    proc = subprocess.run(
        [*argv, "--runtime", "runc", image, "python3", "-c", SYSCALL_LOOP],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"syscall loop exited {proc.returncode}: {proc.stderr[-1000:]}")
    fcntl_ns, getppid_ns = (float(x) for x in proc.stdout.split())
    return fcntl_ns, getppid_ns


def measure_profile(ws: c.Workspace, runs: int, warmup: int) -> dict[str, Any]:
    from executor.policy import seccomp

    switch = EngineDefault()
    executor = ws.executor(c.policy("runc"))
    image = c.policy().image
    ours_file = ws.root / "seccomp.json"
    ours_file.write_text(seccomp.default_profile_json("runc"))
    rows: dict[str, dict[str, list[float]]] = {
        name: {"first_line": [], "end_to_end": [], "fcntl_ns": [], "getppid_ns": []}
        for name in ("ours", "docker")
    }
    for i in range(warmup + runs):
        # Alternate which goes first, so that neither always meets a warmer engine.
        order = ("ours", "docker") if i % 2 == 0 else ("docker", "ours")
        for name in order:
            switch.on = name == "docker"
            task = first_line(ws, executor)
            calls = per_call(ws, ours_file if name == "ours" else None, image)
            if i >= warmup:
                rows[name]["first_line"].append(task["first_line"])
                rows[name]["end_to_end"].append(task["end_to_end"])
                rows[name]["fcntl_ns"].append(calls[0])
                rows[name]["getppid_ns"].append(calls[1])
    switch.on = False
    return {name: {k: c.summary(v) for k, v in row.items()} for name, row in rows.items()}


# -- 2. views ---------------------------------------------------------------------------
def _written() -> int:
    with open("/proc/self/io") as f:
        fields = dict(line.split(": ") for line in f.read().splitlines())
    return int(fields["write_bytes"])


def _make_source(root: Path, count: int, size: int) -> list[Path]:
    src = root / f"src-{count}x{size}"
    src.mkdir()
    blob = os.urandom(size)
    files = []
    for i in range(count):
        path = src / f"f{i:05d}.bin"
        path.write_bytes(blob)
        path.chmod(0o644)
        files.append(path)
    src.chmod(0o755)
    return files


def _links(files: list[Path], view: Path) -> float:
    view.mkdir()
    t = time.perf_counter()
    for f in files:
        os.link(f, view / f.name)
    return time.perf_counter() - t


def _copies(files: list[Path], view: Path) -> dict[str, float]:
    view.mkdir()
    before = _written()
    t = time.perf_counter()
    for f in files:
        shutil.copyfile(f, view / f.name)
    cached = time.perf_counter() - t
    for f in files:
        fd = os.open(view / f.name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {"page_cache": cached, "on_disk": time.perf_counter() - t, "bytes": float(_written() - before)}


def _docker_run(ws: c.Workspace, mounts: list[tuple[Path, str]], image: str) -> float:
    """``docker run`` of ``true`` with ``mounts`` read-only, end to end (the CLI, as in cold_start)."""
    key, value = ws.label
    argv = ["docker", "run", "--rm", "--network", "none", "--label", f"{key}={value}", "--runtime", "runc"]
    for source, target in mounts:
        argv += ["--mount", f"type=bind,source={source},target={target},readonly"]
    return c.time_command([*argv, image, "true"])


def measure_views(ws: c.Workspace, sets: list[tuple[int, int]], runs: int) -> list[dict[str, Any]]:
    image = c.policy().image
    out = []
    for count, size in sets:
        files = _make_source(ws.root, count, size)
        link_s, bind_extra, copies = [], [], []
        for i in range(runs):
            view = ws.root / f"view-{count}x{size}-{i}"
            link_s.append(_links(files, view))
            one_dir = _docker_run(ws, [(view, "/data")], image)
            per_file = _docker_run(ws, [(f, f"/data/{f.name}") for f in files], image)
            bind_extra.append(per_file - one_dir)
            shutil.rmtree(view)
            copy_view = ws.root / f"copy-{count}x{size}-{i}"
            copies.append(_copies(files, copy_view))
            shutil.rmtree(copy_view)
        shutil.rmtree(files[0].parent)
        out.append(
            {
                "files": count,
                "size": size,
                "hard_links_s": c.summary(link_s),
                "bind_mounts_extra_s": c.summary(bind_extra),
                "copy_page_cache_s": c.summary([x["page_cache"] for x in copies]),
                "copy_on_disk_s": c.summary([x["on_disk"] for x in copies]),
                "copy_bytes_written": c.median(x["bytes"] for x in copies),
            }
        )
    return out


# -- output -----------------------------------------------------------------------------
def _size(n: int) -> str:
    return f"{n // (1024 * 1024)} MiB" if n >= 1024 * 1024 else f"{n // 1024} KiB"


def render(report: dict[str, Any]) -> str:
    res = report["results"]
    out = []
    p = res.get("profile")
    if p:
        rows = []
        for name, label in (("docker", "Docker's default (baseline)"), ("ours", "executor's profile")):
            r = p[name]
            rows.append(
                [
                    label,
                    c.ms(r["first_line"]["p50"]),
                    c.times(c.ratio(r["first_line"]["p50"], p["docker"]["first_line"]["p50"])),
                    c.ms(r["end_to_end"]["p50"]),
                    f"{r['fcntl_ns']['p50']:.0f}",
                    c.times(c.ratio(r["fcntl_ns"]["p50"], p["docker"]["fcntl_ns"]["p50"])),
                    f"{r['getppid_ns']['p50']:.0f}",
                    c.times(c.ratio(r["getppid_ns"]["p50"], p["docker"]["getppid_ns"]["p50"])),
                ]
            )
        out.append(
            c.table(
                f"seccomp profile under runc, {report['params']['runs']} rounds (p50)",
                ["", "first line ms", "ratio", "end to end ms", "fcntl ns", "ratio", "getppid ns", "ratio"],
                rows,
            )
        )
        out.append("")
    rows = []
    for v in res.get("views", []):
        rows.append(
            [
                f"{v['files']} x {_size(v['size'])}",
                c.ms(v["hard_links_s"]["p50"]),
                c.ms(v["bind_mounts_extra_s"]["p50"]),
                c.ms(v["copy_page_cache_s"]["p50"]),
                c.ms(v["copy_on_disk_s"]["p50"]),
                f"{v['copy_bytes_written'] / 2**20:.0f}",
                c.times(c.ratio(v["copy_page_cache_s"]["p50"], v["hard_links_s"]["p50"])),
            ]
        )
    if rows:
        out.append(
            c.table(
                f"making a view, {report['params']['view_runs']} run(s) each (ms, p50)",
                [
                    "view of",
                    "hard links",
                    "bind mounts (+docker run)",
                    "copies",
                    "copies on disk",
                    "MiB written",
                    "copies/links",
                ],
                rows,
            )
        )
    return "\n".join(out)


def sets_arg(text: str) -> list[tuple[int, int]]:
    """``100x64k,1000x4m`` -> ``[(100, 65536), (1000, 4194304)]``."""
    out = []
    for item in text.split(","):
        count, _, size = item.strip().lower().partition("x")
        if not count.isdigit() or not size[:-1].isdigit() or size[-1:] not in SIZES:
            raise argparse.ArgumentTypeError(f"expected COUNTxSIZE such as 100x64k or 1000x4m, got {item!r}")
        out.append((int(count), int(size[:-1]) * SIZES[size[-1]]))
    return out


def main() -> None:
    parser = c.base_parser(__doc__ or "")
    parser.add_argument("--runs", type=int, default=10, help="rounds of the profile comparison")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--view-runs", type=int, default=3, help="runs of each view set")
    parser.add_argument(
        "--sets", type=sets_arg, default="100x64k,1000x64k,100x4m", help="view sets COUNTxSIZE"
    )
    parser.add_argument("--skip", choices=("profile", "views"), default=None, help="leave one part out")
    args = parser.parse_args()
    with c.Workspace() as ws:
        results: dict[str, Any] = {}
        if args.skip != "profile":
            results["profile"] = measure_profile(ws, args.runs, args.warmup)
        if args.skip != "views":
            results["views"] = measure_views(ws, args.sets, args.view_runs)
        report = {
            "benchmark": "lock_isolation",
            "machine": c.machine(ws),
            "params": {
                "runs": args.runs,
                "warmup": args.warmup,
                "view_runs": args.view_runs,
                "sets": args.sets,
            },
            "results": results,
            "notes": [
                "profile rows alternate which goes first each round; the baseline is the same executor "
                "with the seccomp entry left out of the engine arguments (Docker 20.10's default applies)",
                "per-call times are measured inside the container (python3 loop, 200,000 calls each)",
                "bind mounts: the extra time of a docker run with one read-only mount per file over one "
                "with the hard-link view's directory; links and copies: the time to make the view",
                "copies on disk: the copy, then fsync of every copy; MiB written from /proc/self/io",
            ],
        }
    c.emit(args, report, render)


if __name__ == "__main__":
    c.entry(main)
