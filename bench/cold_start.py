"""Cold start: submit to the first line of protocol code, runc and runsc, against a spawn and a docker run.

The protocol (bench/protocols/first_line) returns ``time.time()`` from the first
line of ``run(ctx)``; the parent records ``time.time()`` just before
``Executor.run``. Both read the same host clock (containers share the host's
clock under runc and runsc alike). Baselines, measured in the same run:

- a ``multiprocessing`` spawn-context process whose target sends back the time
  of its own first line: the seed's worker process without the container;
- per runtime, ``docker run --rm --network none <sandbox image> python3 -c pass``
  through the docker CLI, timed end to end (CLI start to CLI exit, so it
  includes the container's exit and removal): the least a container can cost;
- per runtime, the same through docker-py (``containers.create``, ``start``,
  ``wait``, ``remove``), as the executor talks to the engine.

Also reported: the median of each phase of ``outcome.timings`` and the time
from the first line to ``Executor.run`` returning (result, exit, removal).

    .venv/bin/python bench/cold_start.py [--runs 10] [--runtimes runc,runsc] [--json]
"""

from __future__ import annotations

import multiprocessing
import time
from typing import Any

import _common as c

PHASES = ("create", "start", "boot", "import", "config", "load", "run", "total")


def _first_line(conn: Any) -> None:
    first = time.time()
    conn.send(first)
    conn.close()


def spawn_once(ws: c.Workspace) -> float:
    """Submit-to-first-line latency of one spawn-context process."""
    mp = multiprocessing.get_context("spawn")
    recv, send = mp.Pipe(duplex=False)
    submitted = time.time()
    proc = ws.track_process(mp.Process(target=_first_line, args=(send,), daemon=True))
    proc.start()
    send.close()
    first = float(recv.recv())
    proc.join()
    recv.close()
    return first - submitted


def docker_py_once(ws: c.Workspace, runtime: str, image: str) -> float:
    """``python3 -c pass`` in a fresh container through docker-py (create, start, wait, remove), timed."""
    client = ws.backend().client
    key, value = ws.label
    started = time.perf_counter()
    container = client.containers.create(
        image, ["python3", "-c", "pass"], network_mode="none", runtime=runtime, labels={key: value}
    )
    try:
        container.start()
        status = container.wait()
    finally:
        container.remove(force=True)
    elapsed = time.perf_counter() - started
    if status.get("StatusCode") != 0:
        raise RuntimeError(f"docker-py python3 -c pass on {runtime} exited {status}")
    return elapsed


def executor_once(ws: c.Workspace, executor: Any, runtime: str, kind: str = "cold") -> dict[str, Any]:
    """One task of the first_line protocol through ``executor``: its first line, return and phases.

    Also ``warm_starts``: 1 if the task took a warm pool's slot.
    """
    from executor.spec import TaskSpec

    spec = TaskSpec(
        protocol_dir=c.PROTOCOLS / "first_line",
        data_dir=ws.data_dir(),
        task_id=c.new_task_id(f"{kind}-{runtime}"),
    )
    handle = ws.run(executor, spec, timeout=300)
    outcome = handle.outcome
    c.check_ok(outcome, f"{kind} start on {runtime}")
    first = float(outcome.result)
    return {
        "first_line": first - handle.submitted,
        "first_line_to_return": handle.returned - first,
        "submit_to_return": handle.returned - handle.submitted,
        "warm_starts": int(getattr(outcome, "warm_starts", 0)),
        "timings": dict(outcome.timings),
    }


def measure(ws: c.Workspace, runtimes: list[str], runs: int, warmup: int, image: str) -> dict[str, Any]:
    """``warmup + runs`` rounds; each round runs every row once, so load drift hits all rows alike.

    A round: a spawn, then per runtime a ``docker run``, a docker-py run and an executor task.
    """
    executors = {rt: ws.executor(c.policy(rt)) for rt in runtimes}
    argv = {rt: c.docker_run_argv(ws, rt, image) for rt in runtimes}
    spawn: list[float] = []
    cli: dict[str, list[float]] = {rt: [] for rt in runtimes}
    dpy: dict[str, list[float]] = {rt: [] for rt in runtimes}
    tasks: dict[str, list[dict[str, Any]]] = {rt: [] for rt in runtimes}
    for i in range(warmup + runs):
        counted = i >= warmup
        t = spawn_once(ws)
        if counted:
            spawn.append(t)
        for rt in runtimes:
            samples = (
                c.time_command(argv[rt]),
                docker_py_once(ws, rt, image),
                executor_once(ws, executors[rt], rt),
            )
            if counted:
                cli[rt].append(samples[0])
                dpy[rt].append(samples[1])
                tasks[rt].append(samples[2])
    results: dict[str, Any] = {
        "baseline_spawn": {"first_line": c.summary(spawn), "samples": spawn},
        "baseline_docker_run": {
            rt: {"end_to_end": c.summary(cli[rt]), "command": " ".join(argv[rt]), "samples": cli[rt]}
            for rt in runtimes
        },
        "baseline_docker_py": {rt: {"end_to_end": c.summary(dpy[rt]), "samples": dpy[rt]} for rt in runtimes},
    }
    for rt in runtimes:
        done = tasks[rt]
        results[rt] = {
            "first_line": c.summary([d["first_line"] for d in done]),
            "first_line_to_return": c.summary([d["first_line_to_return"] for d in done]),
            "submit_to_return": c.summary([d["submit_to_return"] for d in done]),
            "phases_median": {
                p: c.median(d["timings"][p] for d in done if p in d["timings"])
                for p in PHASES
                if any(p in d["timings"] for d in done)
            },
            "samples": [d["first_line"] for d in done],
        }
    return results


def render(report: dict[str, Any]) -> str:
    res = report["results"]
    base = res["baseline_spawn"]["first_line"]
    rows = [["mp spawn (baseline)", c.ms(base["p50"]), c.ms(base["p90"]), "1.00x", "-", "-", "-", "-"]]
    for rt in report["params"]["runtimes"]:
        r = res.get(rt)
        if r is None:
            continue
        q = report["ratios"][rt]
        for key, label in (("docker_run", "docker run CLI"), ("docker_py", "docker-py")):
            e2e = res[f"baseline_{key}"][rt]["end_to_end"]
            rows.append(
                [
                    f"{label} {rt} (baseline)",
                    "-",
                    "-",
                    "-",
                    "-",
                    "-",
                    c.ms(e2e["p50"]),
                    "1.00x" if key == "docker_run" else c.times(q["docker_py_vs_docker_run"]),
                ]
            )
        fl = r["first_line"]
        rows.append(
            [
                f"executor {rt}",
                c.ms(fl["p50"]),
                c.ms(fl["p90"]),
                c.times(q["p50"]),
                c.times(q["first_line_vs_docker_run"]),
                c.ms(r["first_line_to_return"]["p50"]),
                c.ms(r["submit_to_return"]["p50"]),
                c.times(q["return_vs_docker_run"]),
            ]
        )
    n = report["params"]["runs"]
    out = [
        c.table(
            f"submit -> first line of protocol code, {n} runs each (ms; ratios of p50s)",
            [
                "",
                "first line p50",
                "p90",
                "/spawn",
                "/docker run",
                "first->return",
                "end to end p50",
                "e2e/docker run",
            ],
            rows,
        ),
        "",
    ]
    phase_rows = []
    for rt in report["params"]["runtimes"]:
        r = res.get(rt)
        if r is not None:
            phase_rows.append([rt, *(c.ms(r["phases_median"].get(p, float("nan"))) for p in PHASES)])
    if phase_rows:
        out.append(c.table("executor outcome.timings, median (ms)", ["runtime", *PHASES], phase_rows))
    return "\n".join(out)


def main() -> None:
    parser = c.base_parser(__doc__ or "")
    parser.add_argument(
        "--runs", type=int, default=10, help="measured rounds (one run of each row per round)"
    )
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first")
    parser.add_argument("--runtimes", type=c.runtimes_arg, default="runc,runsc", help="OCI runtimes")
    args = parser.parse_args()

    with c.Workspace() as ws:
        known = c.available_runtimes(ws)
        notes = [
            "first line = time.time() at the top of run(ctx); submit = time.time() just before Executor.run "
            "(spawn: just before Process()); same host clock",
            f"{args.warmup} warm-up round(s) not counted (the first executor run also reaps and "
            "connects to the engine); each round runs every row once, in the table's order, so that a "
            "change in load hits the figures and their baselines alike",
            "docker run / docker-py = python3 -c pass in a fresh container of the same image, network none, "
            "no other hardening, timed from before the call to the removed container (end to end)",
        ]
        image = c.policy().image
        runtimes = []
        for rt in args.runtimes:
            if rt in known:
                runtimes.append(rt)
            else:
                notes.append(f"{rt} skipped: the engine knows only {', '.join(known)}")
        results = measure(ws, runtimes, args.runs, args.warmup, image)
        base = results["baseline_spawn"]["first_line"]
        ratios: dict[str, Any] = {}
        for rt in runtimes:
            fl = results[rt]["first_line"]
            run_p50 = results["baseline_docker_run"][rt]["end_to_end"]["p50"]
            ratios[rt] = {
                "p50": c.ratio(fl["p50"], base["p50"]),
                "p90": c.ratio(fl["p90"], base["p90"]),
                "first_line_vs_docker_run": c.ratio(fl["p50"], run_p50),
                "return_vs_docker_run": c.ratio(results[rt]["submit_to_return"]["p50"], run_p50),
                "docker_py_vs_docker_run": c.ratio(
                    results["baseline_docker_py"][rt]["end_to_end"]["p50"], run_p50
                ),
                "docker_run_vs_spawn": c.ratio(run_p50, base["p50"]),
            }
        report = {
            "benchmark": "cold_start",
            "machine": c.machine(ws),
            "params": {"runs": args.runs, "warmup": args.warmup, "runtimes": args.runtimes},
            "results": results,
            "ratios": ratios,
            "notes": notes,
        }
    c.emit(args, report, render)


if __name__ == "__main__":
    c.entry(main)
