"""An orchestrator's load: many tiny tasks from several callers, and a burst larger than the host can boot.

**Sustained.** ``--tasks`` tasks (default 200) whose protocol returns at once,
submitted from ``--threads`` callers (default 4) to one ``Executor``, three
ways in the same run:

- through a warm pool of ``--pool`` slots (default 4);
- cold (no pool);
- baseline: the seed's design, a ``multiprocessing`` spawn child per task,
  from as many caller threads (no isolation at all).

Each row gives tasks/s, how every task ended (by status and error type), and
the latency p50/p90 from submission to outcome.

**Burst.** ``--burst`` tasks (default 128) submitted at once, each from a
thread of its own, whose protocol sleeps ``--sleep`` seconds (default 5):

- admitted: the executor's defaults (at most two sandboxes per CPU starting
  at once, the rest queued, their wall clock not yet running);
- all at once: ``max_starting`` at its maximum (64), so only the liveness
  rule (a silent sandbox whose CPU time advances is slow, not frozen) keeps
  a busy host from judging sandboxes hung;
- baseline: as many ``multiprocessing`` spawn children sleeping as long.

Each row gives the time until the last task ended, how every task ended, the
longest wait in line, and whether anything was left behind (containers of
the executor, task directories). The figures of issue 17: 0 failures and a
warm throughput at least the cold one; 128 at once all OK.

    .venv/bin/python bench/sustained_load.py [--tasks 200] [--threads 4] [--pool 4] [--burst 128]
        [--sleep 5] [--runtime runc] [--json]
"""

from __future__ import annotations

import collections
import multiprocessing
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import _common as c

if TYPE_CHECKING:
    from pathlib import Path

PROTOCOL = (
    "import time\n\n"
    "def run(ctx):\n"
    "    time.sleep(ctx.parameters.get('sleep', 0))\n"
    "    return ctx.parameters['n']\n"
)


def _child(n: int, sleep: float, conn: Any) -> None:
    time.sleep(sleep)
    conn.send(n)


def _protocol(ws: c.Workspace) -> Path:
    path = ws.root / "protocol"
    if not path.exists():
        path.mkdir()
        (path / "protocol.py").write_text(PROTOCOL)
    return path


def _ends(outcomes: list[Any]) -> dict[str, int]:
    counts = collections.Counter(
        o.status.value + (f" {o.error.type}" if o.error is not None else "") for o in outcomes
    )
    return dict(sorted(counts.items()))


def _leftovers(ws: c.Workspace, executor: Any) -> dict[str, int]:
    from executor.backends import LABEL_PARENT, LABEL_WARM

    executor.close()
    containers = [
        labels
        for _, labels in ws.backend().list_managed()
        if labels.get(LABEL_PARENT) == executor.instance_id and labels.get(LABEL_WARM) != "true"
    ]
    dirs = list(ws.run_dir.iterdir()) if ws.run_dir.exists() else []
    return {"containers": len(containers), "task_dirs": len(dirs)}


def _executor_row(
    ws: c.Workspace, args: Any, *, count: int, threads: int, sleep: float, **options: Any
) -> dict[str, Any]:
    from executor.spec import TaskSpec

    pool = options.pop("pool", 0)
    policy = c.policy(args.runtime, warm_pool=pool, timeout_s=600)
    executor = ws.executor(policy, **options)
    if pool:
        executor.warm_up(wait=120)
    protocol, data = _protocol(ws), ws.data_dir()
    latencies: list[float] = []

    def one(n: int) -> Any:
        t = time.perf_counter()
        outcome = executor.run(
            TaskSpec(protocol_dir=protocol, data_dir=data, parameters={"n": n, "sleep": sleep})
        )
        latencies.append(time.perf_counter() - t)
        return outcome

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as callers:
        outcomes = list(callers.map(one, range(count)))
    wall = time.perf_counter() - started
    wrong = [o for o in outcomes if o.ok and o.result not in range(count)]
    return {
        "tasks": count,
        "wall_s": wall,
        "tasks_per_s": count / wall,
        "ends": _ends(outcomes),
        "failures": sum(not o.ok for o in outcomes) + len(wrong),
        "warm_starts": sum(o.warm_starts for o in outcomes),
        "latency": c.summary(latencies),
        "max_queued_s": max((o.timings.get("queued", 0.0) for o in outcomes), default=0.0),
        "gate": executor.gate.stats(),
        "left": _leftovers(ws, executor),
    }


def _spawn_row(count: int, threads: int, sleep: float) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    latencies: list[float] = []

    def one(n: int) -> bool:
        t = time.perf_counter()
        here, there = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(n, sleep, there))
        proc.start()
        ok = here.poll(600) and here.recv() == n
        proc.join()
        here.close()
        there.close()
        latencies.append(time.perf_counter() - t)
        return bool(ok) and proc.exitcode == 0

    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as callers:
        results = list(callers.map(one, range(count)))
    wall = time.perf_counter() - started
    return {
        "tasks": count,
        "wall_s": wall,
        "tasks_per_s": count / wall,
        "ends": {"OK": sum(results)},
        "failures": results.count(False),
        "latency": c.summary(latencies),
    }


def render(report: dict[str, Any]) -> str:
    p, res = report["params"], report["results"]

    def row(label: str, r: dict[str, Any]) -> list[str]:
        ends = ", ".join(f"{k}: {v}" for k, v in r["ends"].items())
        left = r.get("left")
        return [
            label,
            c.num(r["wall_s"], 1),
            c.num(r["tasks_per_s"], 2),
            str(r["failures"]),
            c.ms(r["latency"].get("p50", float("nan"))),
            c.ms(r["latency"].get("p90", float("nan"))),
            c.num(r.get("max_queued_s", float("nan")), 1),
            "-" if left is None else f"{left['containers']} / {left['task_dirs']}",
            ends,
        ]

    headers = ["", "wall s", "tasks/s", "failed", "p50 ms", "p90 ms", "max queued s", "left", "ends"]
    sustained = c.table(
        f"{p['tasks']} tasks from {p['threads']} callers ({p['runtime']})",
        headers,
        [
            row(f"warm pool of {p['pool']}", res["warm"]),
            row("cold", res["cold"]),
            row("multiprocessing spawn (baseline)", res["spawn"]),
        ],
    )
    burst = c.table(
        f"{p['burst']} tasks at once, each sleeping {p['sleep']:g} s ({p['runtime']})",
        headers,
        [
            row("admitted (defaults)", res["burst_admitted"]),
            row("all at once (max_starting=64)", res["burst_all"]),
            row("multiprocessing spawn (baseline)", res["burst_spawn"]),
        ],
    )
    q = report["ratios"]
    return "\n".join(
        [
            sustained,
            "",
            f"throughput warm / cold: {c.times(q['warm_over_cold'])}; "
            f"cold / spawn: {c.times(q['cold_over_spawn'])}",
            "",
            burst,
        ]
    )


def main() -> None:
    parser = c.base_parser(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=200, help="tasks in the sustained run")
    parser.add_argument("--threads", type=int, default=4, help="callers in the sustained run")
    parser.add_argument("--pool", type=int, default=4, help="warm slots in the sustained run")
    parser.add_argument("--burst", type=int, default=128, help="tasks submitted at once")
    parser.add_argument("--sleep", type=float, default=5.0, help="seconds each burst task sleeps")
    parser.add_argument("--runtime", choices=["runc", "runsc"], default="runc", help="OCI runtime")
    args = parser.parse_args()
    with c.Workspace() as ws:
        if args.runtime not in c.available_runtimes(ws):
            parser.error(f"the engine does not know the runtime {args.runtime}")
        results: dict[str, Any] = {}
        results["warm"] = _executor_row(
            ws, args, count=args.tasks, threads=args.threads, sleep=0, pool=args.pool
        )
        results["cold"] = _executor_row(ws, args, count=args.tasks, threads=args.threads, sleep=0)
        results["spawn"] = _spawn_row(args.tasks, args.threads, 0)
        results["burst_admitted"] = _executor_row(
            ws, args, count=args.burst, threads=args.burst, sleep=args.sleep
        )
        results["burst_all"] = _executor_row(
            ws, args, count=args.burst, threads=args.burst, sleep=args.sleep, max_starting=64
        )
        results["burst_spawn"] = _spawn_row(args.burst, args.burst, args.sleep)
        report = {
            "benchmark": "sustained_load",
            "machine": c.machine(ws),
            "params": {
                "tasks": args.tasks,
                "threads": args.threads,
                "pool": args.pool,
                "burst": args.burst,
                "sleep": args.sleep,
                "runtime": args.runtime,
            },
            "results": results,
            "ratios": {
                "warm_over_cold": c.ratio(results["warm"]["tasks_per_s"], results["cold"]["tasks_per_s"]),
                "cold_over_spawn": c.ratio(results["cold"]["tasks_per_s"], results["spawn"]["tasks_per_s"]),
            },
            "notes": [
                "left = containers / task directories of the executor still there after its close()",
                "a burst task's wall clock starts at its first beat; 'max queued s' is its longest wait "
                "for a start permit",
            ],
        }
    c.emit(args, report, render)


if __name__ == "__main__":
    c.entry(main)
