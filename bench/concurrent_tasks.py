"""N concurrent tasks: throughput, failures and parent RSS per task, against the same tasks run sequentially.

Each task (bench/protocols/worker) does a little CPU work and a few mailbox
round trips (send TRAINING_UPDATE, await MODELLER_RESPONSE) with a modeller in
the parent, over one in-memory transport. Both modes run in a fresh child
interpreter of their own, after one warm-up task, so that their RSS numbers do
not share a heap. The parent's RSS is sampled every 20 ms from
``/proc/self/status`` (VmRSS) while the tasks run; RSS per task is
(peak - idle before) / tasks in flight: N when concurrent, 1 when sequential.
The parent here also hosts the modeller, which is small.

The baseline, measured in the same run, is the same N tasks one after another.

    .venv/bin/python bench/concurrent_tasks.py [--tasks 8] [--runtime runc] [--work 1000000]
        [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import _common as c


def _respond(modeller: Any, task_id: str, rounds: int, stop: threading.Event) -> None:
    answered = 0
    while answered < rounds and not stop.is_set():
        msg = modeller.receive(task_id, timeout=0.25)
        if msg is not None and msg.type == "TRAINING_UPDATE":
            modeller.send(task_id, "MODELLER_RESPONSE", b"ack")
            answered += 1


class _Task:
    """One task and its modeller-side responder."""

    def __init__(self, ws: c.Workspace, executor: Any, modeller: Any, args: Any) -> None:
        from executor.mailbox.crypto import TaskKeys
        from executor.spec import TaskSpec

        self.task_id = c.new_task_id("conc")
        keys = TaskKeys.generate()
        modeller.add_task(self.task_id, keys)
        self.spec = TaskSpec(
            protocol_dir=c.PROTOCOLS / "worker",
            data_dir=ws.data_dir(),
            task_id=self.task_id,
            keys=keys,
            parameters={"rounds": args.rounds, "work": args.work},
        )
        self._ws, self._executor = ws, executor
        self._stop = threading.Event()
        self._responder = threading.Thread(
            target=_respond, args=(modeller, self.task_id, args.rounds, self._stop), daemon=True
        )
        self.handle: c.TaskHandle | None = None

    def start(self) -> None:
        self._responder.start()
        self.handle = self._ws.start(self._executor, self.spec)

    def wait(self) -> dict[str, Any]:
        assert self.handle is not None
        try:
            outcome = self.handle.wait(1800)
        except Exception as exc:
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}", "latency_s": math.nan}
        finally:
            self._stop.set()
            self._responder.join(5)
        error = f"{outcome.error.type}: {outcome.error.message}" if outcome.error else ""
        return {
            "ok": outcome.ok,
            "status": outcome.status.value,
            "error": error,
            "latency_s": self.handle.returned - self.handle.submitted,
            "timings": outcome.timings,
        }


def phase(root: Path, mode: str, args: Any) -> dict[str, Any]:
    """Role ``phase``: one warm-up task, then the N tasks ``mode``-ly, in this (fresh) interpreter."""
    with c.Workspace(root=root) as ws:
        transport = ws.transport()
        modeller = ws.modeller(transport)
        executor = ws.executor(c.policy(args.runtime), transport=transport)
        (root / f"instance-{mode}").write_text(executor.instance_id)
        warm = _Task(ws, executor, modeller, args)
        warm.start()
        if not warm.wait()["ok"]:
            raise RuntimeError("the warm-up task failed")
        idle = c.vmrss_mib()
        tasks = [_Task(ws, executor, modeller, args) for _ in range(args.tasks)]
        results = []
        with c.RssSampler() as rss:
            started = time.perf_counter()
            if mode == "concurrent":
                for t in tasks:
                    t.start()
                results = [t.wait() for t in tasks]
            else:
                for t in tasks:
                    t.start()
                    results.append(t.wait())
            wall = time.perf_counter() - started
        in_flight = args.tasks if mode == "concurrent" else 1
        failures = [r for r in results if not r["ok"]]
        return {
            "wall_s": wall,
            "tasks_per_s": args.tasks / wall,
            "failures": len(failures),
            "failure_reasons": sorted({r.get("error", "") for r in failures}),
            "latency": c.summary([r["latency_s"] for r in results if r["ok"]]),
            "rss_idle_mib": idle,
            "rss_peak_mib": rss.peak,
            "rss_per_task_mib": (rss.peak - idle) / in_flight,
            "rss_samples": len(rss.samples),
            "phases_median": {
                k: c.median(r["timings"][k] for r in results if r["ok"] and k in r["timings"])
                for k in ("create", "start", "boot", "run", "total")
            },
        }


def _child(ws: c.Workspace, argv: list[str]) -> dict[str, Any]:
    return ws.run_script(__file__, argv, timeout=3600)


def render(report: dict[str, Any]) -> str:
    res = report["results"]
    rows = []
    for mode, label in (("sequential", "sequential (baseline)"), ("concurrent", "concurrent")):
        r = res[mode]
        rows.append(
            [
                label,
                c.num(r["wall_s"], 2),
                c.num(r["tasks_per_s"], 2),
                str(r["failures"]),
                c.ms(r["latency"].get("p50", math.nan)),
                c.ms(r["latency"].get("max", math.nan)),
                c.num(r["rss_idle_mib"], 1),
                c.num(r["rss_peak_mib"], 1),
                c.num(r["rss_per_task_mib"], 1),
            ]
        )
    p = report["params"]
    q = report["ratios"]
    return "\n".join(
        [
            c.table(
                f"{p['tasks']} tasks on {p['runtime']} ({p['rounds']} mailbox round trips, work={p['work']})",
                [
                    "",
                    "wall s",
                    "tasks/s",
                    "failed",
                    "latency p50 ms",
                    "max ms",
                    "idle MiB",
                    "peak MiB",
                    "MiB/task",
                ],
                rows,
            ),
            "",
            f"throughput concurrent / sequential: {c.times(q['throughput'])}; "
            f"task latency p50 concurrent / sequential: {c.times(q['latency_p50'])}",
        ]
    )


def main() -> None:
    parser = c.base_parser(__doc__ or "")
    parser.add_argument("--tasks", type=int, default=8, help="tasks per mode")
    parser.add_argument("--runtime", choices=["runc", "runsc"], default="runc", help="OCI runtime")
    parser.add_argument("--work", type=int, default=1_000_000, help="loop iterations of CPU work per task")
    parser.add_argument("--rounds", type=int, default=3, help="mailbox round trips per task")
    parser.add_argument("--role", choices=["phase"], help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=["concurrent", "sequential"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "phase":
        print(json.dumps(phase(args.root, args.mode, args)))
        return

    with c.Workspace() as ws:
        if args.runtime not in c.available_runtimes(ws):
            parser.error(f"the engine does not know the runtime {args.runtime}")
        common = ["--tasks", str(args.tasks), "--runtime", args.runtime, "--work", str(args.work)]
        common += ["--rounds", str(args.rounds), "--root", str(ws.root)]
        results = {}
        for mode in ("sequential", "concurrent"):
            ws.adopt_instance_file(ws.root / f"instance-{mode}")
            results[mode] = _child(ws, ["--role", "phase", "--mode", mode, *common])
        seq, conc = results["sequential"], results["concurrent"]
        report = {
            "benchmark": "concurrent",
            "machine": c.machine(ws),
            "params": {
                "tasks": args.tasks,
                "runtime": args.runtime,
                "work": args.work,
                "rounds": args.rounds,
            },
            "results": results,
            "ratios": {
                "throughput": c.ratio(conc["tasks_per_s"], seq["tasks_per_s"]),
                "latency_p50": c.ratio(
                    conc["latency"].get("p50", math.nan), seq["latency"].get("p50", math.nan)
                ),
                "rss_per_task": c.ratio(conc["rss_per_task_mib"], seq["rss_per_task_mib"]),
            },
            "notes": [
                "RSS per task = (peak VmRSS while running - VmRSS before) / tasks in flight",
                "each sandbox is capped at 1 CPU; the host has the cores shown above",
            ],
        }
        for mode in ("sequential", "concurrent"):
            for reason in results[mode]["failure_reasons"]:
                report["notes"].append(f"{mode} failure: {reason}")
    c.emit(args, report, render)


if __name__ == "__main__":
    c.entry(main)
