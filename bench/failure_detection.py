"""Time from a hang, a crash or an OOM to a reported outcome, against what is unavoidable.

Every task runs with heartbeat interval 0.2 s and timeout 1.0 s. The moment of
failure comes from the protocol, on the host clock:

- hang (bench/protocols/hang): sleeps a random 0.3-0.7 s (so that the freeze
  falls at a random point between two beats), reports ``time.time()`` as a
  progress event, then SIGSTOPs its own process, heartbeat thread included;
- crash (bench/protocols/crash): writes ``time.time()`` to stderr, then
  ``os._exit(3)``;
- OOM (bench/protocols/oom, ``memory_mb=128``): writes ``time.time()`` to
  stderr before each 4 MiB step; the last line is within one step of the kill.

"To outcome" ends when ``Executor.run`` returns. A thin wrapper around the
Docker backend stamps when the engine reported the exit (``wait`` returned),
when the supervisor asked for a kill, and when removal finished, which splits
each latency into detection and teardown.

Baselines, measured in the same run: for the hang, the configured heartbeat
timeout (1.0 s): no heartbeat-based detector can be faster on average than
timeout minus half an interval. For the crash and the OOM, the time from a
protocol that returns immediately (bench/protocols/first_line) to its outcome:
the container's normal exit and removal, which every outcome pays.

    .venv/bin/python bench/failure_detection.py [--runs 5] [--runtimes runc,runsc] [--json]
"""

from __future__ import annotations

import math
import random
import re
import time
from typing import Any

import _common as c

HEARTBEAT_INTERVAL_S = 0.2
HEARTBEAT_TIMEOUT_S = 1.0
OOM_MEMORY_MB = 128
SCENARIOS = ("returns", "crash", "oom", "hang")
_STAMP = re.compile(r"(?:crash-at|oom-step|hang-at) ([0-9.]+)")


class StampingBackend:
    """Delegates to the real backend and notes, on the host clock, when exit, kill and removal happened."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.stamps: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def reset(self) -> None:
        self.stamps = {}

    def wait(self, container_id: str) -> Any:
        info = self._inner.wait(container_id)
        self.stamps.setdefault("exited", time.time())
        return info

    def kill(self, container_id: str) -> None:
        self.stamps.setdefault("kill", time.time())
        self._inner.kill(container_id)
        self.stamps.setdefault("killed", time.time())

    def remove(self, container_id: str) -> None:
        self.stamps.setdefault("remove", time.time())
        self._inner.remove(container_id)
        self.stamps.setdefault("removed", time.time())


def _last_stamp(text: str) -> float:
    found = _STAMP.findall(text or "")
    return float(found[-1]) if found else math.nan


def _one(ws: c.Workspace, executor: Any, backend: StampingBackend, scenario: str) -> dict[str, Any]:
    """Run one task of ``scenario``; return its failure moment, stamps and outcome."""
    from executor.spec import TaskSpec

    protocol = "first_line" if scenario == "returns" else scenario
    progress: list[str] = []
    spec = TaskSpec(
        protocol_dir=c.PROTOCOLS / protocol,
        data_dir=ws.data_dir(),
        task_id=c.new_task_id(f"fail-{scenario}"),
        parameters={"delay": random.uniform(0.3, 0.7)} if scenario == "hang" else {},
    )
    backend.reset()
    handle = ws.run(executor, spec, timeout=300, on_progress=lambda u: progress.append(u.info))
    outcome = handle.outcome
    error = outcome.error
    if scenario == "returns":
        failed_at = float(outcome.result) if outcome.ok else math.nan
    elif scenario == "hang":
        failed_at = _last_stamp(" ".join(progress))
    else:
        failed_at = _last_stamp(error.stderr_tail if error else "")
    return {
        "status": outcome.status.value,
        "error_type": error.type if error else "",
        # A heartbeat timeout before the protocol could record anything: the boot
        # (start to first beat) outlasted the heartbeat timeout.
        "startup_timeout": math.isnan(failed_at) and bool(error and error.type == "HeartbeatTimeout"),
        "boot_s": outcome.timings.get("boot", math.nan),
        "failed_at": failed_at,
        "stamps": dict(backend.stamps),
        "returned": handle.returned,
    }


EXPECTED = {
    "returns": ("OK", ""),
    "crash": ("ERROR", "ContainerExited"),
    "oom": ("KILLED", "OutOfMemory"),
    "hang": ("TIMEOUT", "HeartbeatTimeout"),
}


def measure(ws: c.Workspace, runtime: str, runs: int) -> dict[str, Any]:
    """``runs`` tasks of each scenario on ``runtime``, interleaved."""
    backend = StampingBackend(ws.backend())
    common = {"heartbeat_interval_s": HEARTBEAT_INTERVAL_S, "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S}
    executors = {
        s: ws.executor(
            c.policy(runtime, **common, **({"memory_mb": OOM_MEMORY_MB} if s == "oom" else {})),
            backend=backend,
        )
        for s in SCENARIOS
    }
    _one(ws, executors["returns"], backend, "returns")  # warm-up: reap, engine connection
    raw: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
    for _ in range(runs):
        for s in SCENARIOS:
            raw[s].append(_one(ws, executors[s], backend, s))
    out: dict[str, Any] = {}
    for s, items in raw.items():
        want_status, want_type = EXPECTED[s]
        good = [
            i for i in items if i["status"] == want_status and (not want_type or i["error_type"] == want_type)
        ]
        # Detection: the failure to the engine's exit report (or the supervisor's kill, for a hang).
        detect_key = "kill" if s == "hang" else "exited"
        out[s] = {
            "to_outcome": c.summary([i["returned"] - i["failed_at"] for i in good]),
            "to_detect": c.summary(
                [i["stamps"][detect_key] - i["failed_at"] for i in good if detect_key in i["stamps"]]
            ),
            "kill": c.summary(
                [i["stamps"]["killed"] - i["stamps"]["kill"] for i in good if "killed" in i["stamps"]]
            ),
            "remove": c.summary(
                [i["stamps"]["removed"] - i["stamps"]["remove"] for i in good if "removed" in i["stamps"]]
            ),
            "after_remove": c.summary(
                [i["returned"] - i["stamps"]["removed"] for i in good if "removed" in i["stamps"]]
            ),
            "startup_timeouts": sum(1 for i in items if i["startup_timeout"]),
            "unexpected": [
                f"{i['status']} {i['error_type']}"
                for i in items
                if i not in good and not i["startup_timeout"]
            ],
        }
    return out


def render(report: dict[str, Any]) -> str:
    res = report["results"]
    out = []
    for rt in report["params"]["runtimes"]:
        r = res.get(rt)
        if r is None:
            continue
        q = report["ratios"][rt]
        rows = []
        for s in SCENARIOS:
            x = r[s]
            base = "-" if s == "returns" else c.ms(q[s]["baseline_s"])
            rows.append(
                [
                    s,
                    str(x["to_outcome"].get("n", 0)),
                    c.ms(x["to_detect"].get("p50", math.nan)),
                    c.ms(x["kill"].get("p50", math.nan)),
                    c.ms(x["remove"].get("p50", math.nan)),
                    c.ms(x["after_remove"].get("p50", math.nan)),
                    c.ms(x["to_outcome"].get("p50", math.nan)),
                    c.ms(x["to_outcome"].get("max", math.nan)),
                    str(x["startup_timeouts"]),
                    base,
                    "-" if s == "returns" else c.ms(q[s]["overhead_s"]),
                    "-" if s == "returns" else c.times(q[s]["ratio"]),
                ]
            )
        out.append(
            c.table(
                f"{rt}: failure -> reported outcome, medians (ms); heartbeat {HEARTBEAT_INTERVAL_S:g} s / "
                f"{HEARTBEAT_TIMEOUT_S:g} s",
                [
                    "",
                    "n",
                    "detect",
                    "kill",
                    "remove",
                    "after rm",
                    "to outcome",
                    "max",
                    "boot t/o",
                    "baseline",
                    "overhead",
                    "ratio",
                ],
                rows,
            )
        )
        out.append("")
    return "\n".join(out).rstrip()


def main() -> None:
    parser = c.base_parser(__doc__ or "")
    parser.add_argument("--runs", type=int, default=5, help="tasks per scenario and runtime")
    parser.add_argument("--runtimes", type=c.runtimes_arg, default="runc,runsc", help="OCI runtimes")
    args = parser.parse_args()

    with c.Workspace() as ws:
        known = c.available_runtimes(ws)
        notes = [
            "n = tasks that ended as expected; boot t/o = tasks killed as 'frozen' before their first "
            "heartbeat",
            "detect = failure to the engine reporting the exit (crash, OOM, normal return) or to the "
            "supervisor's kill (hang); kill = docker kill; remove = docker rm -f; after rm = executor "
            "teardown after removal",
            "baseline: hang = heartbeat timeout; crash and OOM = a protocol that returns at once "
            "(the 'returns' row), first line to outcome",
            "a clean return is slower than a crash: the runtime's channel.close() waits out grpc's 0.2 s "
            "connectivity poll started by channel_ready_future (executor/sandbox/runtime.py:196,224) when "
            "the protocol ran for less than 0.2 s",
        ]
        results: dict[str, Any] = {}
        ratios: dict[str, Any] = {}
        for rt in args.runtimes:
            if rt not in known:
                notes.append(f"{rt} skipped: the engine knows only {', '.join(known)}")
                continue
            r = results[rt] = measure(ws, rt, args.runs)
            returns = r["returns"]["to_outcome"].get("p50", math.nan)
            ratios[rt] = {}
            for s in ("crash", "oom", "hang"):
                base = HEARTBEAT_TIMEOUT_S if s == "hang" else returns
                got = r[s]["to_outcome"].get("p50", math.nan)
                ratios[rt][s] = {"baseline_s": base, "overhead_s": got - base, "ratio": c.ratio(got, base)}
            for s in SCENARIOS:
                for what in r[s]["unexpected"]:
                    notes.append(f"{rt} {s}: an unexpected outcome ({what}) was left out")
                if r[s]["startup_timeouts"]:
                    notes.append(
                        f"{rt} {s}: {r[s]['startup_timeouts']} task(s) ended TIMEOUT (HeartbeatTimeout) "
                        "before the protocol ran: the supervisor counts the boot against the heartbeat "
                        "timeout (executor/task/supervisor.py:143); left out of the statistics"
                    )
        report = {
            "benchmark": "failure_detection",
            "machine": c.machine(ws),
            "params": {
                "runs": args.runs,
                "runtimes": args.runtimes,
                "heartbeat_interval_s": HEARTBEAT_INTERVAL_S,
                "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
                "oom_memory_mb": OOM_MEMORY_MB,
            },
            "results": results,
            "ratios": ratios,
            "notes": notes,
        }
    c.emit(args, report, render)


if __name__ == "__main__":
    c.entry(main)
