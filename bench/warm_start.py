"""Warm start: submit to the first protocol line from a warm pool, and what an idle warm slot costs.

Two parts, runc and runsc (runsc only if the engine knows it):

1. **First line.** One executor per runtime with ``warm_pool=2``. Before each
   measured task every pool is filled again (``executor.warm_up(wait=60)``), so
   the task takes a booted slot and no refill boots beside it; a task whose
   ``outcome.warm_starts`` is not 1 started cold and is counted as such (the
   run is then reported as not warm). The protocol (bench/protocols/first_line)
   returns ``time.time()`` from the first line of ``run(ctx)``; the parent
   records ``time.time()`` just before ``Executor.run``. Baseline, interleaved
   round by round: cold_start's ``multiprocessing`` spawn-context process that
   sends back the time of its own first line.
2. **Idle pool.** One executor per runtime with ``warm_pool=4``, filled, left
   to settle, then watched for ``--idle-s`` seconds: each slot's memory (its
   container's cgroup usage minus inactive file pages, as ``docker stats``
   shows it), the CPU the slots' containers use (cgroup CPU time over the
   window, as a share of one core), and the CPU the parent process itself uses
   meanwhile (``time.process_time``). Slot ids come from
   ``executor.pool_stats()``.

Data views are hard links (the workspace's data directory and run directory
are both under its ``/tmp/se-XXXX``): a view that needs bind mounts would start
the task cold.

    .venv/bin/python bench/warm_start.py [--runs 10] [--runtimes runc,runsc] [--pool 2]
        [--idle-pool 4] [--idle-s 10] [--json]
"""

from __future__ import annotations

import time
from typing import Any

import _common as c
from cold_start import executor_once, spawn_once

# Phases of a warm task's outcome.timings: ``assign`` replaces ``create``/``start``, ``boot`` runs from the
# assignment to the config fetch, and there is no ``config`` (the runtime asked for it long before).
PHASES = ("assign", "boot", "load", "run", "total")
WARM_UP_WAIT_S = 60.0
# After a pool reports full, its newest slot's sandbox and server still work for a moment (a task that
# takes a slot at once reached its first line in ~40 ms instead of ~15 ms on runc here): each measured
# row waits this long after the fill, so it sees a pool at rest, as a task that arrives later would.
SETTLE_S = 0.5
# The same before the idle window opens, with a margin.
IDLE_SETTLE_S = 2.0


def fill(executors: dict[str, Any]) -> dict[str, float]:
    """Fill every pool, then wait ``SETTLE_S``; the seconds each fill took.

    Raises:
        RuntimeError: A pool was not full within ``WARM_UP_WAIT_S``.
    """
    took = {}
    for rt, ex in executors.items():
        started = time.perf_counter()
        if not ex.warm_up(wait=WARM_UP_WAIT_S):
            raise RuntimeError(
                f"the {rt} warm pool was not full after {WARM_UP_WAIT_S:g} s: {ex.pool_stats()}"
            )
        took[rt] = time.perf_counter() - started
    time.sleep(SETTLE_S)
    return took


def warm_once(ws: c.Workspace, executor: Any, runtime: str) -> dict[str, Any]:
    """One first_line task from ``executor``'s warm pool: cold_start's figures, and what no phase covers."""
    sample = executor_once(ws, executor, runtime, kind="warm")
    timed = sum(sample["timings"].get(p, 0.0) for p in ("assign", "boot", "load"))
    # What the phases before the first line do not account for: the parent's work before it takes
    # a slot, and the sandbox's between the config fetch and the protocol's import.
    sample["untimed"] = sample["first_line"] - timed
    return sample


def measure_first_line(
    ws: c.Workspace, runtimes: list[str], runs: int, warmup: int, pool: int
) -> dict[str, Any]:
    """``warmup + runs`` rounds of a spawn and one warm task per runtime, every pool full before each."""
    executors = {rt: ws.executor(c.policy(rt, warm_pool=pool, timeout_s=60), warm=True) for rt in runtimes}
    spawn: list[float] = []
    tasks: dict[str, list[dict[str, Any]]] = {rt: [] for rt in runtimes}
    refill: dict[str, list[float]] = {rt: [] for rt in runtimes}
    try:
        for i in range(warmup + runs):
            counted = i >= warmup
            fill(executors)
            t = spawn_once(ws)
            if counted:
                spawn.append(t)
            for rt in runtimes:
                sample = warm_once(ws, executors[rt], rt)
                # The slot the task took is being replaced: wait until the pool is full again, so that
                # no boot runs beside the next measured row; the wait is the refill left after the return.
                took = fill({rt: executors[rt]})[rt]
                if counted:
                    tasks[rt].append(sample)
                    refill[rt].append(took)
        stats = {rt: ex.pool_stats() for rt, ex in executors.items()}
    finally:
        for ex in executors.values():
            ex.close()
    results: dict[str, Any] = {"baseline_spawn": {"first_line": c.summary(spawn), "samples": spawn}}
    for rt in runtimes:
        done = tasks[rt]
        cold = sum(1 for d in done if d["warm_starts"] != 1)
        results[rt] = {
            "warm": cold == 0 and bool(done),
            "tasks": len(done),
            "cold_tasks": cold,
            "first_line": c.summary([d["first_line"] for d in done]),
            "submit_to_return": c.summary([d["submit_to_return"] for d in done]),
            "phases_median": {
                p: c.median(d["timings"][p] for d in done if p in d["timings"])
                for p in PHASES
                if any(p in d["timings"] for d in done)
            },
            "refill_after_return_s": c.summary(refill[rt]),
            "untimed": c.summary([d["untimed"] for d in done]),
            "pool_stats_end": stats[rt],
            "samples": [d["first_line"] for d in done],
            "warm_starts": [d["warm_starts"] for d in done],
        }
    return results


# -- the idle pool ----------------------------------------------------------------------------
def _memory_mib(stats: dict[str, Any]) -> dict[str, float]:
    """A container's memory from one ``stats`` sample: usage, inactive file pages, and the difference.

    ``docker stats`` shows usage minus inactive file pages (``inactive_file`` on cgroup v2,
    ``total_inactive_file`` on v1): page cache the kernel may drop at once is not the slot's cost.
    """
    mem = stats.get("memory_stats") or {}
    usage = float(mem.get("usage", float("nan")))
    detail = mem.get("stats") or {}
    inactive = float(detail.get("inactive_file", detail.get("total_inactive_file", 0)))
    return {
        "usage_mib": usage / c.MiB,
        "inactive_file_mib": inactive / c.MiB,
        "working_set_mib": (usage - inactive) / c.MiB,
    }


def _cpu_ns(stats: dict[str, Any]) -> int:
    """A container's cumulative CPU time (ns) from one ``stats`` sample."""
    return int(stats["cpu_stats"]["cpu_usage"]["total_usage"])


def _sample(client: Any, ids: list[str]) -> dict[str, dict[str, Any]]:
    """One stats sample per container (``one_shot``: no second sample for a CPU percentage)."""
    return {cid: client.api.stats(cid, stream=False, one_shot=True) for cid in ids}


def measure_idle(ws: c.Workspace, runtime: str, pool: int, idle_s: float) -> dict[str, Any]:
    """Fill a pool of ``pool`` on ``runtime``, let it settle, and watch it idle for ``idle_s`` seconds."""
    client = ws.backend().client
    rss_before = c.vmrss_mib()
    ex = ws.executor(c.policy(runtime, warm_pool=pool, timeout_s=60), warm=True)
    try:
        started = time.perf_counter()
        full = ex.warm_up(wait=WARM_UP_WAIT_S)
        fill_s = time.perf_counter() - started
        if not full:
            raise RuntimeError(
                f"the {runtime} pool of {pool} was not full after {WARM_UP_WAIT_S:g} s: {ex.pool_stats()}"
            )
        time.sleep(IDLE_SETTLE_S)
        rss_full = c.vmrss_mib()
        before = ex.pool_stats()
        ids = [s["container_id"] for p in before for s in p["slots"] if s.get("ready")]
        if len(ids) != pool:
            raise RuntimeError(f"expected {pool} ready slots on {runtime}, pool_stats says {before}")
        first = _sample(client, ids)
        cpu0 = {cid: _cpu_ns(s) for cid, s in first.items()}
        wall0, proc0 = time.perf_counter(), time.process_time()
        time.sleep(idle_s)
        wall1, proc1 = time.perf_counter(), time.process_time()
        last = _sample(client, ids)
        after = ex.pool_stats()
    finally:
        ex.close()
    window = wall1 - wall0
    memory = {cid[:12]: _memory_mib(s) for cid, s in last.items()}
    per_slot_cpu = {cid[:12]: (_cpu_ns(last[cid]) - cpu0[cid]) / 1e9 / window * 100 for cid in ids}
    same = sorted(ids) == sorted(s["container_id"] for p in after for s in p["slots"] if s.get("ready"))
    return {
        "pool": pool,
        "fill_s": fill_s,
        "window_s": window,
        "memory_per_slot_mib": c.summary([m["working_set_mib"] for m in memory.values()]),
        "memory_usage_per_slot_mib": c.summary([m["usage_mib"] for m in memory.values()]),
        "slots_memory": memory,
        "containers_cpu_pct": sum(per_slot_cpu.values()),
        "slots_cpu_pct": per_slot_cpu,
        "parent_cpu_pct": (proc1 - proc0) / window * 100,
        "parent_rss_growth_mib": rss_full - rss_before,
        "slots_unchanged": same,
        "pool_stats_start": before,
        "pool_stats_end": after,
    }


# -- output -----------------------------------------------------------------------------------
def render(report: dict[str, Any]) -> str:
    res, q, p = report["results"], report["ratios"], report["params"]
    fl = res["first_line"]
    base = fl["baseline_spawn"]["first_line"]
    rows = [["mp spawn (baseline)", c.ms(base["p50"]), c.ms(base["p90"]), "1.00x", "-", "-", "-"]]
    for rt in p["runtimes"]:
        r = fl.get(rt)
        if r is None:
            continue
        rows.append(
            [
                f"warm executor {rt}",
                c.ms(r["first_line"]["p50"]),
                c.ms(r["first_line"]["p90"]),
                c.times(q[rt]["p50"]),
                c.times(q[rt]["p90"]),
                c.ms(r["submit_to_return"]["p50"]),
                "yes" if r["warm"] else f"no: {r['cold_tasks']} of {r['tasks']} cold",
            ]
        )
    out = [
        c.table(
            f"submit -> first line of protocol code from a warm pool of {p['pool']}, {p['runs']} runs each "
            "(ms; ratios of p50s and of p90s)",
            ["", "first line p50", "p90", "/spawn p50", "/spawn p90", "end to end p50", "all warm"],
            rows,
        ),
        "",
    ]
    phase_rows = [
        [
            rt,
            *(c.ms(fl[rt]["phases_median"].get(ph, float("nan"))) for ph in PHASES),
            c.ms(fl[rt]["untimed"]["p50"]),
        ]
        for rt in p["runtimes"]
        if rt in fl
    ]
    if phase_rows:
        out += [
            c.table(
                "warm outcome.timings, median (ms); untimed = first line - (assign + boot + load)",
                ["runtime", *PHASES, "untimed"],
                phase_rows,
            ),
            "",
        ]
    idle_rows = []
    for rt in p["runtimes"]:
        r = res["idle"].get(rt)
        if r is None:
            continue
        idle_rows.append(
            [
                rt,
                c.num(r["memory_per_slot_mib"]["p50"], 1),
                c.num(r["memory_usage_per_slot_mib"]["p50"], 1),
                c.num(r["containers_cpu_pct"], 2),
                c.num(r["parent_cpu_pct"], 2),
                c.num(r["containers_cpu_pct"] + r["parent_cpu_pct"], 2),
                c.num(r["fill_s"], 1),
            ]
        )
    if idle_rows:
        out.append(
            c.table(
                f"an idle pool of {p['idle_pool']} over {p['idle_s']:g} s (memory MiB per slot, median; "
                "CPU % of one core)",
                ["runtime", "memory/slot", "usage/slot", "slots CPU", "parent CPU", "total CPU", "fill s"],
                idle_rows,
            )
        )
    return "\n".join(out)


def main() -> None:
    parser = c.base_parser(__doc__ or "")
    parser.add_argument(
        "--runs", type=int, default=10, help="measured rounds (a spawn and a warm task per runtime)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--runtimes", type=c.runtimes_arg, default="runc,runsc", help="OCI runtimes")
    parser.add_argument(
        "--pool", type=int, default=2, help="warm slots per runtime for the first-line rounds"
    )
    parser.add_argument("--idle-pool", type=int, default=4, help="warm slots of the idle pool")
    parser.add_argument("--idle-s", type=float, default=10.0, help="seconds the idle pool is watched")
    args = parser.parse_args()

    with c.Workspace() as ws:
        known = c.available_runtimes(ws)
        notes = [
            "first line = time.time() at the top of run(ctx); submit = time.time() just before Executor.run "
            "(spawn: just before Process()); same host clock",
            f"before every spawn and every task each pool is refilled (warm_up(wait={WARM_UP_WAIT_S:g})) "
            f"and left {SETTLE_S:g} s to settle, so the task takes a booted slot and no replacement boots "
            "beside it; "
            f"{args.warmup} warm-up round(s) not counted",
            "a task with outcome.warm_starts != 1 started cold: the runtime is then reported as not warm",
            "idle memory = the slot container's cgroup memory usage minus inactive file pages (docker "
            "stats' figure); usage = with them. CPU = cgroup CPU time over the window as % of one core, "
            "summed over the pool's containers; parent = this process's time.process_time over the same "
            "window. Not counted: dockerd, containerd and the containers' shims",
        ]
        runtimes = []
        for rt in args.runtimes:
            if rt in known:
                runtimes.append(rt)
            else:
                notes.append(f"{rt} skipped: the engine knows only {', '.join(known)}")
        first_line = measure_first_line(ws, runtimes, args.runs, args.warmup, args.pool)
        idle = {rt: measure_idle(ws, rt, args.idle_pool, args.idle_s) for rt in runtimes}
        base = first_line["baseline_spawn"]["first_line"]
        ratios = {
            rt: {
                "p50": c.ratio(first_line[rt]["first_line"]["p50"], base["p50"]),
                "p90": c.ratio(first_line[rt]["first_line"]["p90"], base["p90"]),
            }
            for rt in runtimes
        }
        for rt in runtimes:
            if not first_line[rt]["warm"]:
                notes.append(
                    f"{rt}: NOT WARM: {first_line[rt]['cold_tasks']} of {first_line[rt]['tasks']} measured "
                    "tasks started cold (warm_starts != 1)"
                )
            if not idle[rt]["slots_unchanged"]:
                notes.append(f"{rt}: the idle pool's slots changed during the idle window")
        report = {
            "benchmark": "warm_start",
            "machine": c.machine(ws),
            "params": {
                "runs": args.runs,
                "warmup": args.warmup,
                "runtimes": args.runtimes,
                "pool": args.pool,
                "idle_pool": args.idle_pool,
                "idle_s": args.idle_s,
            },
            "results": {"first_line": first_line, "idle": idle},
            "ratios": ratios,
            "notes": notes,
        }
    c.emit(args, report, render)


if __name__ == "__main__":
    c.entry(main)
