"""What a protocol reporting progress in a tight loop costs the parent: CPU, events and --events bytes.

The protocol (bench/protocols/progress_flood) runs for ``--seconds`` through
``Executor.run`` with an ``EventsFile`` hook, as ``run --events FILE`` has,
in one of three modes:

- ``steps``: ``ctx.progress.step`` in a tight loop (with an epoch start and
  end every ``--per-epoch`` steps, 500 by default, 0 for none): an eager
  but honest protocol;
- ``raw``: a Report of progress itself in a tight loop, past anything
  ``ctx.progress`` does in the sandbox: what a hostile protocol (or an image
  whose runtime does not coalesce steps) can make the parent do;
- ``sleep``: the baseline, measured in the same run: the same task sleeping
  as long, so starting, supervising and removing the sandbox cancel out.

The parent's CPU is this process's user + system time (``getrusage``) over
``Executor.run``; the cost of the progress is the difference to the
sleeping task, over the protocol's own seconds, as a share of one core.
Rounds are interleaved (sleep, steps, raw in each) so a change in load hits
all alike.

``--engine docker`` (the default) runs real sandboxes: their runtime is the
image's, so whether ``ctx.progress`` coalesces steps depends on when the
image was built (the report says). ``--engine host`` runs this checkout's
runtime as host processes under the test engine (``executor.testing``, no
isolation: the protocol is ours), to measure a runtime the image does not
have yet; the sandbox's own CPU is then another process's and not counted.

    .venv/bin/python bench/progress_cost.py [--seconds 10] [--rounds 3] [--per-epoch 500]
                                            [--engine docker|host] [--runtime runc] [--json]
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import time
from typing import TYPE_CHECKING, Any

import _common as c

if TYPE_CHECKING:
    from pathlib import Path

MODES = ("sleep", "steps", "raw")


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def one_task(
    ws: c.Workspace, executor: Any, mode: str, seconds: float, per_epoch: int, events: Path
) -> dict[str, Any]:
    """Run the protocol once in ``mode``; the parent's CPU, the events and their bytes."""
    from executor.spec import TaskSpec

    events.write_bytes(b"")
    spec = TaskSpec(
        protocol_dir=c.PROTOCOLS / "progress_flood",
        data_dir=ws.data_dir(),
        task_id=c.new_task_id(f"progress-{mode}"),
        parameters={"seconds": seconds, "mode": mode, "per_epoch": per_epoch},
    )
    cpu = _cpu_s()
    wall = time.perf_counter()
    handle = ws.run(executor, spec, timeout=seconds + 300)
    wall = time.perf_counter() - wall
    cpu = _cpu_s() - cpu
    c.check_ok(handle.outcome, f"progress {mode}")
    result = handle.outcome.result
    kinds: collections.Counter[str] = collections.Counter()
    text = events.read_bytes()
    for line in text.splitlines():
        event = json.loads(line)
        kinds[event["kind"] if event["event"] == "algorithm_progress" else event["event"]] += 1
    return {
        "mode": mode,
        "cpu_s": cpu,
        "wall_s": wall,
        "protocol_s": result["seconds"],
        "calls": result["calls"],
        "sandbox_coalesces": result["coalescing"],
        "events_bytes": len(text),
        "events": dict(kinds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each protocol runs")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-epoch", type=int, default=500, help="steps per epoch (0: no epochs)")
    parser.add_argument("--runtime", default="runc", help="the OCI runtime (docker engine only)")
    parser.add_argument("--engine", choices=("docker", "host"), default="docker")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from executor.hooks import EventsFile

    with c.Workspace() as ws:
        events = ws.root / "events.jsonl"
        hook = EventsFile(events)
        try:
            policy = c.policy(args.runtime, timeout_s=args.seconds + 120)
            if args.engine == "host":
                from executor.testing import FakeBackend, host_runtime

                scratch = ws.root / "scratch"
                scratch.mkdir()
                backend: Any = FakeBackend(host_runtime(scratch))
                executor = ws.executor(policy, backend=backend, hooks=[hook], warm=False)
            else:
                executor = ws.executor(policy, hooks=[hook], warm=False)
            runs: list[dict[str, Any]] = []
            for _ in range(args.rounds):
                for mode in MODES:
                    runs.append(one_task(ws, executor, mode, args.seconds, args.per_epoch, events))
        finally:
            hook.close()
    report = summarise(runs, args)
    print(json.dumps(report) if args.json else render(report))


def summarise(runs: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    base = c.median(r["cpu_s"] for r in runs if r["mode"] == "sleep")
    out: dict[str, Any] = {
        "machine": c.machine(),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "per_epoch": args.per_epoch,
        "engine": args.engine,
        "runtime": args.runtime if args.engine == "docker" else "host processes",
        "sandbox_coalesces": all(r["sandbox_coalesces"] for r in runs),
        "baseline_sleep_cpu_s": base,
        "runs": runs,
        "results": {},
    }
    for mode in MODES[1:]:
        mine = [r for r in runs if r["mode"] == mode]
        out["results"][mode] = {
            "parent_core_share": c.median((r["cpu_s"] - base) / r["protocol_s"] for r in mine),
            "step_calls_per_s": c.median(r["calls"] / r["protocol_s"] for r in mine),
            "events_per_s": c.median(sum(r["events"].values()) / r["protocol_s"] for r in mine),
            "step_events_per_s": c.median(r["events"].get("step", 0) / r["protocol_s"] for r in mine),
            "events_bytes_per_s": c.median(r["events_bytes"] / r["protocol_s"] for r in mine),
        }
    return out


def render(report: dict[str, Any]) -> str:
    coalesces = "coalesces steps" if report["sandbox_coalesces"] else "sends every step"
    lines = [
        f"progress in a tight loop: {report['engine']} ({report['runtime']}), {report['seconds']:g} s x "
        f"{report['rounds']} rounds, an epoch every {report['per_epoch'] or 'never'} steps; "
        f"the sandbox's ctx.progress {coalesces}",
        f"baseline (the same task sleeping as long): {report['baseline_sleep_cpu_s']:.2f} s of parent CPU",
        f"{'mode':<6} {'parent core':>12} {'protocol steps/s':>17} {'events/s':>9} {'steps/s':>8} "
        f"{'--events B/s':>13}",
    ]
    for mode, r in report["results"].items():
        lines.append(
            f"{mode:<6} {r['parent_core_share']:>11.1%} {r['step_calls_per_s']:>17.0f} "
            f"{r['events_per_s']:>9.1f} {r['step_events_per_s']:>8.1f} {r['events_bytes_per_s']:>13.0f}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    c.entry(main)
