"""Run every benchmark with ``--json``, keep each result, and write BENCHMARKS.md (what `make bench` does).

The benchmarks run one after another (never at once: they would measure each
other), each in a fresh interpreter with the arguments in ``PLAN``. Each one's
JSON goes to ``bench/results/<name>.json`` and its stderr to
``bench/results/<name>.log``; ``bench/results/run.json`` holds the machine,
the versions, the commit, the load averages and each benchmark's wall time.
BENCHMARKS.md is rendered from those files alone, so ``--render-only``
rewrites it without measuring again.

A benchmark that fails is recorded as failed (with its stderr's tail) and the
others still run; the exit status is then 1. Ctrl-C or SIGTERM is passed to the
running benchmark, which removes what it made before this script exits.

    .venv/bin/python bench/report.py [--only cold_start,mailbox_rtt] [--render-only] [--quick]
        [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import _common as c

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

RESULTS = c.BENCH_DIR / "results"
# name -> extra arguments, in the order they run. The issue 12 targets fix two of them: 32 tasks at
# once, 256 MiB each way. concurrent_tasks and sustained_load (issue 17: 200 tasks through a pool, 128
# at once) run last: their sandboxes raise the load average themselves.
PLAN: dict[str, list[str]] = {
    "cold_start": ["--runs", "10"],
    "warm_start": ["--runs", "10", "--idle-s", "10"],
    "peer_sandbox": ["--runs", "10"],
    "mailbox_rtt": ["--rounds", "500", "--size", "1024"],
    "bulk_transfer": ["--mib", "256", "--repeats", "3"],
    "failure_detection": ["--runs", "5"],
    "progress_cost": ["--seconds", "10", "--rounds", "3"],
    "concurrent_tasks": ["--tasks", "32"],
    "sustained_load": ["--tasks", "200", "--threads", "4", "--pool", "4", "--burst", "128"],
}
# A smoke test of the whole pipeline in about two minutes; its figures are not for comparison.
QUICK: dict[str, list[str]] = {
    "cold_start": ["--runs", "2"],
    "warm_start": ["--runs", "2", "--idle-s", "2"],
    "peer_sandbox": ["--runs", "2"],
    "mailbox_rtt": ["--rounds", "50"],
    "bulk_transfer": ["--mib", "16", "--repeats", "1"],
    "failure_detection": ["--runs", "1"],
    "progress_cost": ["--seconds", "2", "--rounds", "1"],
    "concurrent_tasks": ["--tasks", "4"],
    "sustained_load": ["--tasks", "8", "--burst", "8", "--sleep", "1"],
}
# Per benchmark, how long it may take before it is stopped (seconds).
TIMEOUT_S = 1200


# -- the run ------------------------------------------------------------------------------
def _out(argv: Sequence[str]) -> str:
    """A command's stdout, stripped; '' when it cannot run."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _load1() -> float:
    return round(os.getloadavg()[0], 2)


def machine_and_versions() -> dict[str, Any]:
    """What BENCHMARKS.md says about the machine, the software and the tree it measured."""
    from importlib.metadata import PackageNotFoundError, version

    cpu = ""
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    engine: dict[str, Any] = {}
    raw = _out(["docker", "info", "--format", "{{json .}}"])
    if raw:
        info = json.loads(raw)
        engine = {
            "server": info.get("ServerVersion"),
            "cgroup": info.get("CgroupVersion"),
            "cgroup_driver": info.get("CgroupDriver"),
            "storage": info.get("Driver"),
            "runtimes": sorted(info.get("Runtimes") or {}),
        }
    packages = {}
    for name in ("grpcio", "protobuf", "docker", "cryptography"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    watched = ["executor", "images", "proto", "bench", "Makefile", "pyproject.toml", "constraints.txt"]
    status = subprocess.run(
        ["git", "-C", str(c.REPO), "status", "--porcelain", "--", *watched],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    dirty = status.stdout.splitlines() if status.returncode == 0 else ["(git status failed)"]
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "kernel": platform.release(),
        "docker_client": _out(["docker", "version", "--format", "{{.Client.Version}}"]),
        "engine": engine,
        "runsc": _out(["runsc", "--version"]).splitlines()[0] if _out(["runsc", "--version"]) else None,
        "python": platform.python_version(),
        "packages": packages,
        "commit": _out(["git", "-C", str(c.REPO), "rev-parse", "HEAD"]),
        "commit_subject": _out(["git", "-C", str(c.REPO), "log", "-1", "--format=%s"]),
        "uncommitted": [line[3:] for line in dirty],
        "sandbox_image": _out(["docker", "image", "inspect", "--format", "{{.Id}}", c.SANDBOX_IMAGE]),
    }


# The benchmark running now, for the SIGTERM handler to pass the signal on.
_current: list[subprocess.Popen[bytes]] = []


def _on_sigterm(signum: int, frame: object) -> None:
    for proc in _current:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    raise KeyboardInterrupt(f"signal {signum}")


def _settle(proc: subprocess.Popen[bytes]) -> None:
    """Give a signalled benchmark time to remove what it made; kill it only if it hangs."""
    try:
        proc.wait(3 * c.CANCEL_JOIN_S + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _run_one(results: Path, name: str, args: list[str]) -> dict[str, Any]:
    """Run one benchmark with ``--json``; save its JSON and stderr; return its record for run.json."""
    argv = [sys.executable, str(c.BENCH_DIR / f"{name}.py"), *args, "--json"]
    out_path, log = results / f"{name}.json", results / f"{name}.log"
    out_path.unlink(missing_ok=True)
    partial = results / f"{name}.json.partial"
    record: dict[str, Any] = {"args": args, "load1_start": _load1()}
    print(f"bench: {name} {' '.join(args)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    with partial.open("wb") as out, log.open("wb") as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err, cwd=c.REPO)
        _current.append(proc)
        try:
            proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGTERM)
            _settle(proc)
            record["error"] = f"stopped after {TIMEOUT_S} s"
        except KeyboardInterrupt:
            # Ctrl-C reached the benchmark too (same process group), SIGTERM was passed on.
            _settle(proc)
            raise
        finally:
            _current.clear()
    record.update(wall_s=time.perf_counter() - started, load1_end=_load1(), exit=proc.returncode)
    try:
        if proc.returncode != 0:
            raise ValueError(record.get("error") or log.read_text(errors="replace")[-2000:].strip())
        report = json.loads(partial.read_text())
        out_path.write_text(json.dumps(report, indent=2) + "\n")
        record["status"] = "ok"
    except ValueError as exc:  # a failure, or output that is not JSON
        record.update(status="failed", error=str(exc))
    finally:
        partial.unlink(missing_ok=True)
    print(f"bench: {name} {record['status']} in {record['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return record


def run(results: Path, plan: dict[str, list[str]], names: list[str]) -> dict[str, Any]:
    """Run ``names`` in order and write run.json; a run limited by ``--only`` keeps the others' records."""
    results.mkdir(parents=True, exist_ok=True)
    previous = _read(results / "run.json") or {}
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load1_start": _load1(),
        "machine": machine_and_versions(),
        "quick": plan is QUICK,
        "benchmarks": dict(previous.get("benchmarks", {})) if len(names) < len(plan) else {},
    }
    started = time.perf_counter()
    for name in names:
        meta["benchmarks"][name] = _run_one(results, name, plan[name])
    meta.update(load1_end=_load1(), wall_s=time.perf_counter() - started, only=names)
    (results / "run.json").write_text(json.dumps(c.clean(meta), indent=2) + "\n")
    return meta


# -- rendering ------------------------------------------------------------------------
def _read(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def _get(data: Any, *keys: Any) -> Any:
    """``data[k1][k2]...``, or None where a step is missing."""
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _f(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) else math.nan


def ms(seconds: Any) -> str:
    """Seconds as a table cell in ms."""
    text = c.ms(_f(seconds))
    return "-" if text == "-" else f"{text} ms"


def x(value: Any) -> str:
    """A ratio as a table cell."""
    v = _f(value)
    if math.isnan(v):
        return "-"
    return f"{v:.1f}x" if v >= 10 else f"{v:.2f}x"


def mibs(mib: Any, seconds: Any) -> str:
    """Throughput as a table cell."""
    rate = c.ratio(_f(mib), _f(seconds))
    return "-" if math.isnan(rate) else f"{rate:.0f} MiB/s"


def cell(value: Any) -> str:
    """Text from a result made safe for a table cell: no pipes, no newlines, no markup."""
    text = "".join(ch if ch.isprintable() else " " for ch in str(value))
    return text.replace("|", "\\|").replace("`", "'").replace("<", "&lt;")


def md_table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """A markdown table; the first ``left`` columns are left-aligned, the others right-aligned."""
    align = [":--" if i < left else "--:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# Run-to-run spread of these figures on the shared 2-core machine (bench/README.md): a ratio within
# this fraction of its target is met or missed by less than the noise.
NOISE = 0.30


def _status(value: float, target: float, at_most: bool) -> str:
    """Met or not in this run, and whether the margin is within the run-to-run noise."""
    if math.isnan(value):
        return "not measured"
    ok = value <= target if at_most else value >= target
    margin = abs(value - target) / target
    text = "**met** in this run" if ok else "not met"
    if margin < NOISE:
        text += f" (by {margin:.0%}: within the ±{NOISE:.0%} noise, not firm)"
    return text


def targets(res: dict[str, Any]) -> str:
    """Issue 12's target table with what this run measured beside each target."""
    cold, warm, rtt, bulk, conc = (
        res.get(k) for k in ("cold_start", "warm_start", "mailbox_rtt", "bulk_transfer", "concurrent_tasks")
    )
    rows = warm_targets(warm)
    cold_ratio = _f(_get(cold, "ratios", "runc", "first_line_vs_docker_run"))
    rows.append(
        [
            "same, cold, runc (p50)",
            f"{x(cold_ratio)} docker run ({ms(_get(cold, 'results', 'runc', 'first_line', 'p50'))} vs "
            f"{ms(_get(cold, 'results', 'baseline_docker_run', 'runc', 'end_to_end', 'p50'))})",
            "≤ 1.3x `docker run --rm --network none` … `python3 -c pass`",
            _status(cold_ratio, 1.3, at_most=True),
        ]
    )
    rtt_ratio = _f(_get(rtt, "ratios", "runc", "p50_vs_grpc"))
    rows.append(
        [
            "mailbox round trip p50, runc",
            f"{x(rtt_ratio)} grpc ({ms(_get(rtt, 'results', 'runc', 'rtt', 'p50'))} vs "
            f"{ms(_get(rtt, 'results', 'baseline_grpc', 'rtt', 'p50'))})",
            "≤ 1.5x bare grpcio bidi ping-pong, Unix socket",
            _status(rtt_ratio, 1.5, at_most=True),
        ]
    )
    mib = _get(bulk, "params", "mib")
    for way, key in (("up", "up_pod"), ("down", "down_pod")):
        # ratios are sandbox time / pipe time; the target is on throughput, pipe time / sandbox time.
        speed = c.ratio(1.0, _f(_get(bulk, "ratios", "runc", key)))
        e2e = c.ratio(1.0, _f(_get(bulk, "ratios", "runc", key.replace("_pod", "_total"))))
        rows.append(
            [
                f"{mib} MiB {way}, runc, with encryption (pod; e2e {x(e2e)})",
                f"{x(speed)} pipe throughput",
                "≥ 1.0x plain pipe",
                _status(speed, 1.0, at_most=False),
            ]
        )
    growth = _f(_get(bulk, "results", "runc", "rss_after_mib")) - _f(
        _get(bulk, "results", "runc", "rss_before_mib")
    )
    rows.append(
        [
            "same, parent peak RSS growth",
            "-" if math.isnan(growth) else f"{growth:.0f} MiB",
            "≤ 64 MiB",
            _status(growth, 64, at_most=True),
        ]
    )
    tasks = _get(conc, "params", "tasks")
    failures = _get(conc, "results", "concurrent", "failures")
    per_task = _f(_get(conc, "results", "concurrent", "rss_per_task_mib"))
    if conc is None:
        status = "not measured"
    elif tasks != 32:
        status = f"not measured: this run had {tasks} tasks"
    else:
        status = "**met**" if failures == 0 else "not met"
    rows.append(
        [
            f"{tasks} tasks at once, runc, {cold and _get(cold, 'machine', 'cpus')} cores",
            f"{failures} failures; {per_task:.1f} MiB parent RSS per task" if conc else "-",
            "0 failures (32 tasks); RSS per task reported",
            status,
        ]
    )
    rows += idle_targets(warm)
    rows += load_targets(res.get("sustained_load"))
    return md_table(["figure", "measured (this run)", "target", "status"], rows, left=4)


def warm_targets(warm: dict[str, Any] | None) -> list[list[str]]:
    """The two warm first-line rows of the targets table: p50 ÷ the spawn baseline of the same run."""
    rows = []
    spawn = _get(warm, "results", "first_line", "baseline_spawn", "first_line", "p50")
    for rt, figure, target in (
        ("runc", "submit → first protocol line, warm pool, runc (p50)", 0.2),
        ("runsc", "same, warm pool, runsc (p50)", 0.3),
    ):
        r = _get(warm, "results", "first_line", rt)
        value = _f(_get(warm, "ratios", rt, "p50"))
        if warm is None:
            measured, status = "-", "not measured"
        elif r is None:
            measured, status = "-", f"not measured: {rt} not in this run (see the notes)"
        else:
            measured = f"{x(value)} spawn ({ms(_get(r, 'first_line', 'p50'))} vs {ms(spawn)})"
            status = (
                _status(value, target, at_most=True)
                if r.get("warm")
                else f"not measured warm: {r.get('cold_tasks')} of {r.get('tasks')} tasks started cold"
            )
        rows.append([figure, measured, f"≤ {target:.2f}x spawn", status])
    return rows


# Issue 12: a pool of 4 idle warm slots costs less than this share of one core (containers and parent).
IDLE_CPU_TARGET_PCT = 5.0


def idle_targets(warm: dict[str, Any] | None) -> list[list[str]]:
    """The idle-pool rows of the targets table, one per runtime: memory per slot, and the pool's CPU."""
    figure = "idle warm slot: memory; pool of 4 at idle"
    target = f"reported; < {IDLE_CPU_TARGET_PCT:g}% of one core"
    idle = _get(warm, "results", "idle") or {}
    if not idle:
        return [[figure, "-", target, "not measured"]]
    pool = _get(warm, "params", "idle_pool")
    rows = []
    for n, (rt, r) in enumerate(idle.items()):
        total = _f(r.get("containers_cpu_pct")) + _f(r.get("parent_cpu_pct"))
        rows.append(
            [
                f"{figure}, {rt}" if n == 0 else f"same, {rt}",
                f"{_f(_get(r, 'memory_per_slot_mib', 'p50')):.0f} MiB per slot; the pool {total:.2f}% of a "
                f"core ({_f(r.get('containers_cpu_pct')):.2f}% containers + "
                f"{_f(r.get('parent_cpu_pct')):.2f}% parent, over {_f(r.get('window_s')):.0f} s)",
                target,
                f"not measured: this run's pool had {pool} slots"
                if pool != 4
                else _status(total, IDLE_CPU_TARGET_PCT, at_most=True),
            ]
        )
    return rows


def warm_section(warm: dict[str, Any]) -> list[str]:
    res, q, p = warm["results"], warm["ratios"], warm["params"]
    fl, idle = res["first_line"], res["idle"]
    spawn = fl["baseline_spawn"]["first_line"]
    rows = [
        ["`multiprocessing` spawn (baseline)", ms(spawn["p50"]), ms(spawn["p90"]), "1", "1", "-", "-", "-"]
    ]
    for rt in p["runtimes"]:
        r = fl.get(rt)
        if r is None:
            continue
        rows.append(
            [
                f"**warm executor, {rt}**",
                ms(r["first_line"]["p50"]),
                ms(r["first_line"]["p90"]),
                x(q[rt]["p50"]),
                x(q[rt]["p90"]),
                ms(r["submit_to_return"]["p50"]),
                ms(_get(r, "refill_after_return_s", "p50")),
                "yes" if r.get("warm") else f"**no**: {r.get('cold_tasks')} of {r.get('tasks')} cold",
            ]
        )
    phases = ["assign", "boot", "load", "run"]
    phase_rows = [
        [rt, *(ms(_get(fl, rt, "phases_median", ph)) for ph in phases), ms(_get(fl, rt, "untimed", "p50"))]
        for rt in p["runtimes"]
        if rt in fl
    ]
    idle_rows = []
    for rt in p["runtimes"]:
        r = idle.get(rt)
        if r is None:
            continue
        mem = r["memory_per_slot_mib"]
        idle_rows.append(
            [
                rt,
                f"{_f(mem['p50']):.1f} MiB ({_f(mem['min']):.1f}-{_f(mem['max']):.1f})",
                f"{_f(_get(r, 'memory_usage_per_slot_mib', 'p50')):.1f} MiB",
                f"{_f(r['containers_cpu_pct']):.2f}%",
                f"{_f(r['parent_cpu_pct']):.2f}%",
                f"**{_f(r['containers_cpu_pct']) + _f(r['parent_cpu_pct']):.2f}%**",
                f"{_f(r['parent_rss_growth_mib']) / max(1, int(r['pool'])):.1f} MiB",
                f"{_f(r['fill_s']):.1f} s",
            ]
        )
    return [
        f"### Warm start (`warm_start.py`, pool of {p['pool']} per runtime, {p['runs']} runs per row)",
        "",
        "First line = submit to the first line of `run(ctx)` for a task that takes a booted warm slot "
        "(`outcome.warm_starts == 1`). Every pool is full again before each spawn and each task, and left "
        "0.5 s to settle, so no replacement boots beside a measured row; refill = how long after "
        "`Executor.run` returned the pool was full again. Ratios are of p50s and of p90s.",
        "",
        md_table(
            [
                "",
                "first line p50",
                "p90",
                "p50 vs spawn",
                "p90 vs spawn",
                "end to end p50",
                "refill",
                "all warm",
            ],
            rows,
        ),
        "",
        "Median `outcome.timings` phases of a warm task (`assign` replaces `create` and `start`; `boot` "
        "runs from the assignment to the config fetch). Untimed = first line - (assign + boot + load): "
        "the parent's work before it takes a slot, and the sandbox's between the config fetch and the "
        "protocol's import, which no phase covers:",
        "",
        md_table(["runtime", *phases, "untimed"], phase_rows),
        "",
        f"An idle pool of {p['idle_pool']}, watched for {p['idle_s']:g} s after it was full. "
        "Memory per slot = the container's cgroup usage minus inactive file pages "
        "(what `docker stats` shows; median, range); usage = with them. "
        "CPU is % of one core over the window: the pool's containers (cgroup CPU time), "
        "the parent process (`time.process_time`), and both; dockerd, containerd and the shims "
        "are not counted. Parent RSS per slot = this process's VmRSS growth while the pool filled, "
        "÷ slots.",
        "",
        md_table(
            [
                "runtime",
                "memory per slot",
                "usage per slot",
                "containers CPU",
                "parent CPU",
                "pool CPU",
                "parent RSS per slot",
                "fill",
            ],
            idle_rows,
        ),
        "",
    ]


def cold_section(cold: dict[str, Any], peer: dict[str, Any] | None) -> list[str]:
    res, q = cold["results"], cold["ratios"]
    spawn = res["baseline_spawn"]["first_line"]
    rows = [["`multiprocessing` spawn (baseline)", ms(spawn["p50"]), ms(spawn["p90"]), "1", "-", "-", "-"]]
    for rt in cold["params"]["runtimes"]:
        if rt not in res:
            continue
        cli = res["baseline_docker_run"][rt]["end_to_end"]
        dpy = res["baseline_docker_py"][rt]["end_to_end"]
        rows.append([f"`docker run` CLI, {rt} (baseline)", "-", "-", "-", "-", ms(cli["p50"]), "1"])
        rows.append(
            [
                f"docker-py create/start/wait/remove, {rt}",
                "-",
                "-",
                "-",
                "-",
                ms(dpy["p50"]),
                x(q[rt]["docker_py_vs_docker_run"]),
            ]
        )
        r = res[rt]
        rows.append(
            [
                f"**executor, {rt}**",
                ms(r["first_line"]["p50"]),
                ms(r["first_line"]["p90"]),
                x(q[rt]["p50"]),
                x(q[rt]["first_line_vs_docker_run"]),
                ms(r["submit_to_return"]["p50"]),
                x(q[rt]["return_vs_docker_run"]),
            ]
        )
    out = [
        f"### Cold start (`cold_start.py`, {cold['params']['runs']} runs per row)",
        "",
        "First line = submit to the first line of `run(ctx)` (the `docker run` rows have none: they are "
        "timed end to end). End to end = submit to `Executor.run` returning, or the docker CLI/docker-py "
        "call to the removed container. Ratios are of p50s.",
        "",
        md_table(
            ["", "first line p50", "p90", "vs spawn", "vs docker run", "end to end p50", "e2e vs docker run"],
            rows,
        ),
        "",
    ]
    phases = ["create", "start", "boot", "import", "config", "load"]
    phase_rows = [
        [rt, *(ms(_get(res, rt, "phases_median", p)) for p in phases)]
        for rt in cold["params"]["runtimes"]
        if rt in res
    ]
    out += [
        "Median `outcome.timings` phases (`boot` includes `import`):",
        "",
        md_table(["runtime", *phases], phase_rows),
        "",
    ]
    if peer is not None:
        out += peer_section(peer, cold)
    return out


def peer_section(peer: dict[str, Any], cold: dict[str, Any] | None) -> list[str]:
    res, q = peer["results"], peer["ratios"]
    title = f"### A peer library on the same image (`peer_sandbox.py`, {peer['params']['runs']} runs per row)"
    if "install_error" in res:
        return [
            title,
            "",
            f"Not measured: `{peer['params']['package']}` could not be installed:",
            "",
            "```",
            res["install_error"],
            "```",
            "",
        ]
    rows = []
    cross = []
    for rt in peer["params"]["runtimes"]:
        if rt not in res:
            continue
        base, p = res[rt]["baseline_docker_run"]["end_to_end"], res[rt]["peer"]
        rows.append([f"`docker run` CLI, {rt} (baseline)", "-", "-", "-", "-", ms(base["p50"]), "1"])
        rows.append(
            [
                f"llm-sandbox {p['version']}, {rt}",
                ms(p["first_line"]["p50"]),
                ms(p["open"]["p50"]),
                ms(p["execute"]["p50"]),
                ms(p["close"]["p50"]),
                ms(p["end_to_end"]["p50"]),
                x(q[rt]["end_to_end_vs_docker_run"]),
            ]
        )
        ex = _get(cold, "results", rt)
        if ex:
            cross.append(
                f"{rt}: executor first line {x(c.ratio(ex['first_line']['p50'], p['first_line']['p50']))} "
                "llm-sandbox's, end to end "
                f"{x(c.ratio(ex['submit_to_return']['p50'], p['end_to_end']['p50']))}"
            )
    out = [
        title,
        "",
        f"`{peer['params']['package']}` installed into a throwaway venv, Docker backend, on "
        f"`{peer['params']['image']}` (local image, network none, nothing pulled). A session is opened, runs "
        "one `execute_command` of `python3 -c` that prints its first line's time, and is closed. It needs "
        "settings to run on this image at all (see the notes); its container gets none of the executor's "
        "hardening, no mailbox and no supervision. The `docker run` rows here are this script's own "
        "baseline, each run back to back with a session.",
        "",
        md_table(
            ["", "first line p50", "open", "execute", "close", "end to end p50", "e2e vs docker run"], rows
        ),
        "",
    ]
    if cross:
        out += [
            "Executor ÷ llm-sandbox, p50s from two scripts of this run (a minute apart, so less firm "
            "than a ratio to a baseline beside it): " + "; ".join(cross) + ".",
            "",
        ]
    return out


def rtt_section(rtt: dict[str, Any]) -> list[str]:
    res, q, p = rtt["results"], rtt["ratios"], rtt["params"]
    queue, grpc = res["baseline_queue"]["rtt"], res["baseline_grpc"]["rtt"]
    rows = [
        [
            "`multiprocessing.Queue` ping-pong (baseline)",
            ms(queue["p50"]),
            ms(queue["p99"]),
            "1",
            "-",
            "-",
            "-",
        ],
        [
            f"grpcio {res['baseline_grpc'].get('grpcio', '')} bidi stream, Unix socket (baseline)",
            ms(grpc["p50"]),
            ms(grpc["p99"]),
            x(q["grpc_vs_queue"]["p50"]),
            "1",
            "-",
            "-",
        ],
    ]
    for rt in p["runtimes"]:
        if rt in res:
            r = res[rt]
            rows.append(
                [
                    f"**sandbox, {rt}**",
                    ms(r["rtt"]["p50"]),
                    ms(r["rtt"]["p99"]),
                    x(q[rt]["p50"]),
                    x(q[rt]["p50_vs_grpc"]),
                    f"{_f(r['round_trips_per_s']):.0f}",
                    str(r["throttled_calls"]),
                ]
            )
    return [
        f"### Mailbox round trip (`mailbox_rtt.py`, {p['rounds']} rounds, {p['size']} bytes each way)",
        "",
        "Sandbox: modeller → parent → sandbox (MODELLER_RESPONSE) and back (TRAINING_UPDATE), sealed and "
        "opened with AES-GCM at each end, each message an operation on the runtime's one long-lived "
        "mailbox stream. grpc baseline: one open bidi stream, "
        "raw bytes, server in a spawned child.",
        "",
        md_table(["", "p50", "p99", "p50 vs queue", "p50 vs grpc", "round trips/s", "throttled"], rows),
        "",
    ]


def bulk_section(bulk: dict[str, Any]) -> list[str]:
    res, q, p = bulk["results"], bulk["ratios"], bulk["params"]
    mib = p["mib"]
    base = res["baseline_pipe"]
    rows = [
        [
            "`multiprocessing.Pipe` (baseline: no crypto, no disk)",
            mibs(mib, base["up_s"]),
            "-",
            mibs(mib, base["down_s"]),
            "-",
            f"{_f(base['rss_after_mib']) - _f(base['rss_before_mib']):.0f} MiB",
        ]
    ]
    ratio_rows = []
    for rt in p["runtimes"]:
        if rt not in res:
            continue
        r = res[rt]
        rows.append(
            [
                f"**sandbox, {rt}**",
                mibs(mib, r["up_pod_s"]),
                mibs(mib, r["up_total_s"]),
                mibs(mib, r["down_pod_s"]),
                mibs(mib, r["down_total_s"]),
                f"{_f(r['rss_after_mib']) - _f(r['rss_before_mib']):.0f} MiB",
            ]
        )
        ratio_rows.append(
            [rt, *(x(c.ratio(1.0, _f(q[rt][k]))) for k in ("up_pod", "up_total", "down_pod", "down_total"))]
        )
    return [
        f"### Bulk transfer (`bulk_transfer.py`, {mib} MiB each way, median of {p['repeats']})",
        "",
        "pod = what the pod's parent adds; e2e also counts the in-process modeller's own AES-GCM pass.",
        "",
        md_table(["", "up (pod)", "up (e2e)", "down (pod)", "down (e2e)", "parent peak RSS growth"], rows),
        "",
        "Throughput as a fraction of the pipe's (1 = as fast as the pipe):",
        "",
        md_table(["runtime", "up (pod)", "up (e2e)", "down (pod)", "down (e2e)"], ratio_rows),
        "",
    ]


def concurrent_section(conc: dict[str, Any]) -> list[str]:
    res, q, p = conc["results"], conc["ratios"], conc["params"]
    rows = []
    for mode, label in (
        ("sequential", "one after another (baseline)"),
        ("concurrent", f"**{p['tasks']} at once**"),
    ):
        r = res[mode]
        rows.append(
            [
                label,
                f"{_f(r['wall_s']):.1f} s",
                f"{_f(r['tasks_per_s']):.2f}",
                str(r["failures"]),
                ms(_get(r, "latency", "p50")),
                f"{_f(r['rss_per_task_mib']):.1f} MiB",
                f"{_f(r['rss_peak_mib']):.0f} / {_f(r['rss_idle_mib']):.0f} MiB",
            ]
        )
    return [
        f"### Concurrent tasks (`concurrent_tasks.py`, {p['tasks']} tasks on {p['runtime']}, "
        f"{p['rounds']} mailbox round trips each)",
        "",
        md_table(
            ["", "wall", "tasks/s", "failed", "task latency p50", "parent RSS per task", "peak / idle RSS"],
            rows,
        ),
        "",
        f"Throughput at once ÷ one after another: {x(q['throughput'])}; "
        f"task latency p50: {x(q['latency_p50'])}.",
        "",
    ]


def failure_section(fail: dict[str, Any]) -> list[str]:
    res, q, p = fail["results"], fail["ratios"], fail["params"]
    rows = []
    for rt in p["runtimes"]:
        if rt not in res:
            continue
        for s in ("returns", "crash", "oom", "hang"):
            r = res[rt][s]
            base = "-" if s == "returns" else ms(q[rt][s]["baseline_s"])
            rows.append(
                [
                    rt,
                    s + (" (baseline)" if s == "returns" else ""),
                    str(_get(r, "to_outcome", "n") or 0),
                    ms(_get(r, "to_outcome", "p50")),
                    base,
                    "-" if s == "returns" else x(q[rt][s]["ratio"]),
                    str(r["startup_timeouts"]),
                ]
            )
    return [
        f"### Failure to outcome (`failure_detection.py`, heartbeat {p['heartbeat_interval_s']} s / "
        f"{p['heartbeat_timeout_s']} s, {p['runs']} runs each)",
        "",
        "Baseline: hang = the heartbeat timeout; crash and OOM = a protocol that returns at once "
        "(its first line to its outcome). boot t/o = healthy tasks killed as frozen before their first beat.",
        "",
        md_table(
            ["runtime", "scenario", "n", "to outcome p50", "baseline", "vs baseline", "boot t/o"],
            rows,
            left=2,
        ),
        "",
    ]


def sustained_section(load: dict[str, Any]) -> list[str]:
    res, q, p = load["results"], load["ratios"], load["params"]

    def row(label: str, r: dict[str, Any]) -> list[str]:
        left = r.get("left")
        return [
            label,
            f"{_f(r['wall_s']):.1f} s",
            f"{_f(r['tasks_per_s']):.2f}",
            str(r["failures"]),
            ms(_get(r, "latency", "p50")),
            ms(_get(r, "latency", "p90")),
            "-" if r.get("max_queued_s") is None else f"{_f(r['max_queued_s']):.1f} s",
            "-" if left is None else f"{left['containers']} / {left['task_dirs']}",
            cell(", ".join(f"{k}: {v}" for k, v in r["ends"].items())),
        ]

    headers = ["", "wall", "tasks/s", "failed", "p50", "p90", "longest wait in line", "left", "ends"]
    return [
        f"### Sustained load and bursts (`sustained_load.py`, {p['runtime']})",
        "",
        f"{p['tasks']} tasks that return at once, from {p['threads']} callers through one executor:",
        "",
        md_table(
            headers,
            [
                row(f"warm pool of {p['pool']}", res["warm"]),
                row("cold", res["cold"]),
                row("`multiprocessing` spawn (baseline)", res["spawn"]),
            ],
        ),
        "",
        f"Throughput warm ÷ cold: {x(q['warm_over_cold'])}; cold ÷ spawn: {x(q['cold_over_spawn'])}.",
        "",
        f"{p['burst']} tasks submitted at once, each sleeping {p['sleep']:g} s (left = containers / task "
        "directories of the executor after its close):",
        "",
        md_table(
            headers,
            [
                row("admitted (defaults)", res["burst_admitted"]),
                row("all at once (`max_starting=64`)", res["burst_all"]),
                row("`multiprocessing` spawn (baseline)", res["burst_spawn"]),
            ],
        ),
        "",
    ]


def progress_section(prog: dict[str, Any]) -> list[str]:
    rows = [
        [
            f"`{mode}`",
            f"{_f(r['parent_core_share']):.1%}",
            f"{_f(r['step_calls_per_s']):.0f}",
            f"{_f(r['events_per_s']):.1f}",
            f"{_f(r['step_events_per_s']):.1f}",
            f"{_f(r['events_bytes_per_s']) / 1024:.1f} KiB/s",
        ]
        for mode, r in prog["results"].items()
    ]
    coalesces = "coalesces steps" if prog.get("sandbox_coalesces") else "sends every step (an older image)"
    return [
        f"### Progress in a tight loop (`progress_cost.py`, {cell(prog['engine'])} {cell(prog['runtime'])}, "
        f"{prog['seconds']:g} s x {prog['rounds']} rounds)",
        "",
        f"The parent's CPU over that of the same task sleeping as long (baseline, "
        f"{_f(prog['baseline_sleep_cpu_s']):.2f} s), per second of the protocol's loop; an `EventsFile` "
        f"hook as `--events`. The sandbox's `ctx.progress` {coalesces}. `raw` calls Report with progress "
        "itself, as a hostile protocol can.",
        "",
        md_table(
            ["mode", "parent core", "protocol steps/s", "events/s", "step events/s", "to --events"],
            rows,
        ),
        "",
    ]


def load_targets(load: dict[str, Any] | None) -> list[list[str]]:
    """Issue 17's rows: the sustained run and the burst."""
    if load is None:
        return [["issue 17: sustained load and burst", "-", "-", "not measured"]]
    res, p = load["results"], load["params"]
    warm, cold, burst = res["warm"], res["cold"], res["burst_admitted"]
    ratio = _f(_get(load, "ratios", "warm_over_cold"))
    full = p["tasks"] >= 200 and p["burst"] >= 128
    sustained_ok = warm["failures"] == 0 and cold["failures"] == 0 and ratio >= 1.0
    burst_ok = burst["failures"] == 0 and burst["left"] == {"containers": 0, "task_dirs": 0}
    return [
        [
            f"{p['tasks']} tasks, {p['threads']} callers, warm pool of {p['pool']}, {p['runtime']}",
            f"{warm['failures']} failed warm, {cold['failures']} cold; warm {x(ratio)} cold throughput "
            f"({_f(warm['tasks_per_s']):.2f} vs {_f(cold['tasks_per_s']):.2f} tasks/s)",
            "0 failures; throughput ≥ 1.0x cold (issue 17)",
            ("**met**" if sustained_ok else "not met")
            + ("" if full else " (a smaller run than the target's)"),
        ],
        [
            f"{p['burst']} tasks at once, {p['runtime']}",
            f"{burst['failures']} failed; left {burst['left']['containers']} containers, "
            f"{burst['left']['task_dirs']} task directories",
            "all OK (queued ones later), nothing left behind (issue 17)",
            ("**met**" if burst_ok else "not met") + ("" if full else " (a smaller run than the target's)"),
        ],
    ]


SECTIONS: dict[str, Callable[[dict[str, Any]], list[str]]] = {
    "warm_start": warm_section,
    "mailbox_rtt": rtt_section,
    "bulk_transfer": bulk_section,
    "concurrent_tasks": concurrent_section,
    "failure_detection": failure_section,
    "progress_cost": progress_section,
    "sustained_load": sustained_section,
}


def render(results: Path, meta: dict[str, Any]) -> str:
    """BENCHMARKS.md from run.json (``meta``) and the per-benchmark JSON files in ``results``."""
    res: dict[str, Any] = {name: _read(results / f"{name}.json") for name in PLAN}
    m, eng = meta["machine"], meta["machine"].get("engine", {})
    pk = m.get("packages", {})
    runs = meta.get("benchmarks", {})
    total = sum(_f(r.get("wall_s")) for r in runs.values())
    dirty = m.get("uncommitted") or []
    tree = (
        "as committed"
        if not dirty
        else f"with uncommitted changes in {', '.join(f'`{cell(d)}`' for d in dirty[:12])}"
    )
    if len(dirty) > 12:
        tree += f" and {len(dirty) - 12} more"
    out = [
        "# Benchmarks",
        "",
        *(
            ["**A `--quick` smoke run with tiny counts: these figures are not for comparison.**", ""]
            if meta.get("quick")
            else []
        ),
        f"Written by `make bench` (`bench/report.py`) on {meta['date']}. Do not edit the figures by "
        "hand: run `make bench` again (or `.venv/bin/python bench/report.py --render-only` to re-render "
        "the last run's JSON in `bench/results/`). How each benchmark measures is in `bench/README.md`.",
        "",
        "Every figure stands beside a baseline measured **in the same run** on the same machine; ratios are "
        "figure ÷ baseline of the medians (p50) unless a column says otherwise. No test asserts any of these "
        "times.",
        "",
        "## Machine and software",
        "",
        md_table(
            ["", ""],
            [
                ["CPU", f"{m.get('cpus')} cores, {cell(m.get('cpu_model'))}"],
                ["memory", f"{m.get('mem_gib')} GiB"],
                ["kernel", cell(m.get("kernel"))],
                [
                    "Docker",
                    f"engine {cell(eng.get('server'))} (client {cell(m.get('docker_client'))}), cgroup "
                    f"v{cell(eng.get('cgroup'))} ({cell(eng.get('cgroup_driver'))}), "
                    f"storage {cell(eng.get('storage'))}, "
                    f"runtimes {', '.join(eng.get('runtimes') or [])}",
                ],
                ["runsc", cell(m.get("runsc") or "not installed")],
                [
                    "Python",
                    f"{m.get('python')}; grpcio {pk.get('grpcio')}, protobuf {pk.get('protobuf')}, "
                    f"docker-py {pk.get('docker')}, cryptography {pk.get('cryptography')}",
                ],
                [
                    "commit",
                    f"`{cell(m.get('commit', '')[:12])}` ({cell(m.get('commit_subject', '')[:80])}), {tree}",
                ],
                ["sandbox image", f"`{c.SANDBOX_IMAGE}` `{cell(m.get('sandbox_image', '')[:19])}`"],
                [
                    "load average (1 min)",
                    f"{meta.get('load1_start')} at the start, {meta.get('load1_end')} at the end "
                    "(per benchmark below)",
                ],
                ["benchmarks' wall time", f"{total / 60:.1f} min (after `make images`)"],
            ],
            left=2,
        ),
        "",
        "Other engineers' test suites may share this Docker engine and these 2 cores while the benchmarks "
        "run; the load averages say how busy the machine was. They include the benchmarks' own work "
        "(`concurrent_tasks.py` and `sustained_load.py` run many sandboxes at once, so they run last). "
        "Earlier runs varied by about ±30% (more for runsc and the pipe baseline), so read ratios near a "
        "target as a tie, and compare a figure with the baseline beside it rather than with another run's.",
        "",
        "## Targets",
        "",
        "Measured against the targets of issue 12 (speed) and issue 17 (load) (ratios on this 2-core "
        "machine, same run). A target is marked met only when this run measured it within the target.",
        "",
        targets(res),
        "",
        "## Results",
        "",
    ]
    if res.get("cold_start"):
        out += cold_section(res["cold_start"], res.get("peer_sandbox"))
    elif res.get("peer_sandbox"):
        out += peer_section(res["peer_sandbox"], None)
    for name, section in SECTIONS.items():
        if res.get(name):
            out += section(res[name])
    run_rows = []
    for name in PLAN:
        r = runs.get(name)
        if r is None:
            run_rows.append([f"`{name}.py`", "-", "not run", "-", "-"])
            continue
        status = r.get("status", "?")
        if status != "ok":
            status = f"**failed** (exit {r.get('exit')}): {cell(str(r.get('error', ''))[-300:])}"
        run_rows.append(
            [
                f"`{name}.py {' '.join(r.get('args', []))}`",
                f"{_f(r.get('wall_s')):.0f} s",
                status,
                str(r.get("load1_start")),
                str(r.get("load1_end")),
            ]
        )
    out += [
        "## The run",
        "",
        md_table(["benchmark", "wall", "status", "load1 start", "load1 end"], run_rows),
        "",
    ]
    notes = [(name, n) for name, r in res.items() if r for n in r.get("notes", [])]
    if notes:
        out += ["## Notes from the benchmarks", ""]
        out += [f"- `{name}`: {cell(n)}" for name, n in notes]
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(PLAN)}")
    parser.add_argument("--render-only", action="store_true", help="re-render from the results only")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a 2-minute smoke run with tiny counts, kept apart in bench/results/quick/ (written there too)",
    )
    parser.add_argument("--out", type=Path, help="the markdown to write (default: BENCHMARKS.md)")
    args = parser.parse_args()

    plan, results = (QUICK, RESULTS / "quick") if args.quick else (PLAN, RESULTS)
    out = args.out or (results / "BENCHMARKS.md" if args.quick else c.REPO / "BENCHMARKS.md")
    names = list(plan)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = set(names) - set(plan)
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
    if args.render_only:
        meta = _read(results / "run.json")
        if meta is None:
            parser.error(f"no {results / 'run.json'}: run without --render-only first")
    else:
        signal.signal(signal.SIGTERM, _on_sigterm)
        meta = run(results, plan, names)
    out.write_text(render(results, meta))
    print(f"bench: wrote {out}", file=sys.stderr)
    failed = [n for n, r in meta.get("benchmarks", {}).items() if r.get("status") != "ok"]
    if failed:
        print(f"bench: failed: {', '.join(failed)} (see {results}/*.log)", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    c.entry(main)
