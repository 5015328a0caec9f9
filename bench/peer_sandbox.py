"""A peer Docker sandbox library on the same image (llm-sandbox's Docker backend), against a docker run.

llm-sandbox is installed from PyPI into a throwaway venv inside this script's
workspace (``pip install llm-sandbox[docker]==VERSION``; removed on exit, never
in the project's requirements), unless ``--venv`` names one that already has
it. Its measurements run in that venv's interpreter, a child of this script.

What a user of llm-sandbox gets on the sandbox image, per runtime, ``--runs``
times: ``SandboxSession(backend="docker", image=<sandbox image>)`` opened
(create and start a container), one ``execute_command`` of ``python3 -c`` that
prints ``time.time()`` (its first line), then ``close`` (stop and remove).
Submit = ``time.time()`` just before the session is made, as in cold_start.py.

Settings it needs on this image, passed through its ``runtime_configs`` (docker-py
``containers.create`` keywords) and session options, each for a reason the
report's notes give: ``network_mode="none"``; ``command=["sleep", "infinity"]``
(the image's default command exits at once, and a session execs into a running
container); ``init=True`` (without an init, ``sleep`` as PID 1 ignores the
SIGTERM of ``close``'s ``docker stop``, which then waits its 10 s grace);
``skip_environment_setup=True`` and ``workdir="/tmp"`` (its setup runs
``python -m venv`` and ``pip install --upgrade pip``: the image has only
``python3`` and the container no network). Its own ``run(code)`` calls
``python``, which the image lacks, so the code runs through ``execute_command``.
A probe records what ``run(code)`` does with only the network and label set.

Baseline, measured in the same run: ``docker run --rm --network none <image>
python3 -c pass`` through the docker CLI, end to end (as cold_start.py), run
back to back with each session so that a change in load hits both alike.

Every container it starts is labelled for the workspace and removed on exit.

    .venv/bin/python bench/peer_sandbox.py [--runs 10] [--runtimes runc,runsc] [--version 0.3.46]
        [--venv DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as c

PACKAGE = "llm-sandbox"
DEFAULT_VERSION = "0.3.46"
# The first line of code in the container prints the host-clock time (containers share the host's clock).
FIRST_LINE = "python3 -c 'import time; print(repr(time.time()))'"


# -- in the venv's interpreter ----------------------------------------------------------
def _session(image: str, runtime: str, label: tuple[str, str], keep_alive: bool, setup: bool) -> Any:
    """A session on ``image`` with network none and the workspace's label.

    ``keep_alive``: a command that keeps the container up, and an init that passes ``docker stop``'s
    SIGTERM on. ``setup``: llm-sandbox's own environment setup (venv, pip upgrade) and workdir.
    """
    from llm_sandbox import SandboxSession

    key, value = label
    configs: dict[str, Any] = {"network_mode": "none", "runtime": runtime, "labels": {key: value}}
    if keep_alive:
        configs.update(command=["sleep", "infinity"], init=True)
    options: dict[str, Any] = {} if setup else {"skip_environment_setup": True, "workdir": "/tmp"}
    return SandboxSession(lang="python", backend="docker", image=image, runtime_configs=configs, **options)


def _probe(ws: c.Workspace, image: str, runtime: str) -> dict[str, str]:
    """What llm-sandbox's own ``run(code)`` does here: with its defaults, then with a keep-alive."""
    out = {}
    for name, keep_alive in (("its defaults", False), ("a keep-alive command and its setup", True)):
        try:
            with _session(image, runtime, ws.label, keep_alive=keep_alive, setup=True) as session:
                result = session.run("print('hello')")
            text = f"exit {result.exit_code}: {(result.stderr or result.stdout).strip()[:300]}"
        except Exception as exc:
            text = f"{type(exc).__name__}: {str(exc)[:300]}"
        out[name] = text
    return out


def _session_once(ws: c.Workspace, image: str, runtime: str) -> dict[str, float]:
    """One session: open, one command that prints its first line's time, close; timed on the host clock."""
    submitted = time.time()
    session = _session(image, runtime, ws.label, keep_alive=True, setup=False)
    try:
        session.open()
        t_open = time.time()
        result = session.execute_command(FIRST_LINE)
        t_exec = time.time()
    finally:
        session.close()
    t_close = time.time()
    if result.exit_code != 0:
        raise RuntimeError(f"llm-sandbox on {runtime}: exit {result.exit_code}: {result.stderr[-500:]}")
    return {
        "first_line": float(result.stdout.strip()) - submitted,
        "open": t_open - submitted,
        "execute": t_exec - t_open,
        "close": t_close - t_exec,
        "end_to_end": t_close - submitted,
    }


def llm_sandbox_runs(ws: c.Workspace, image: str, runtime: str, runs: int, warmup: int) -> dict[str, Any]:
    """Role ``peer``: ``warmup + runs`` rounds of one ``docker run`` and one session, on ``runtime``.

    Each round runs the baseline and the session back to back, so that a change in load hits both.
    """
    from importlib.metadata import version

    argv = c.docker_run_argv(ws, runtime, image)
    baseline: list[float] = []
    sessions: list[dict[str, float]] = []
    for i in range(warmup + runs):
        pair = c.time_command(argv), _session_once(ws, image, runtime)
        if i >= warmup:
            baseline.append(pair[0])
            sessions.append(pair[1])
    keys = ("first_line", "open", "execute", "close", "end_to_end")
    peer: dict[str, Any] = {k: c.summary([s[k] for s in sessions]) for k in keys}
    peer.update(version=version(PACKAGE), samples=[s["first_line"] for s in sessions])
    return {
        "baseline_docker_run": {
            "end_to_end": c.summary(baseline),
            "command": " ".join(argv),
            "samples": baseline,
        },
        "peer": peer,
    }


# -- in the project's interpreter -----------------------------------------------------
def install(ws: c.Workspace, venv: Path | None, pin: str) -> dict[str, Any]:
    """A venv with llm-sandbox: ``venv`` as given, or a new one in the workspace; never raises."""
    if venv is not None:
        return {"python": str(venv / "bin" / "python"), "installed_here": False, "install_s": 0.0}
    venv = ws.root / "venv"
    started = time.perf_counter()
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    steps = [[sys.executable, "-m", "venv", str(venv)], [*pip, "--no-input", f"{PACKAGE}[docker]=={pin}"]]
    for argv in steps:
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False)
        except subprocess.TimeoutExpired:
            return {"error": f"{' '.join(argv)} did not finish within 600 s"}
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip()[-1500:]
            return {"error": f"{' '.join(argv[-2:])} exited {proc.returncode}: {tail}"}
    return {
        "python": str(venv / "bin" / "python"),
        "installed_here": True,
        "install_s": time.perf_counter() - started,
    }


def render(report: dict[str, Any]) -> str:
    res = report["results"]
    if "install_error" in res:
        return f"{PACKAGE} not measured: {res['install_error']}"
    rows = []
    for rt in report["params"]["runtimes"]:
        r = res.get(rt)
        if r is None:
            continue
        base = r["baseline_docker_run"]["end_to_end"]
        q = report["ratios"][rt]
        rows.append([f"docker run CLI {rt} (baseline)", "-", "-", "-", "-", c.ms(base["p50"]), "1.00x", "-"])
        p = r["peer"]
        rows.append(
            [
                f"{PACKAGE} {p['version']} {rt}",
                c.ms(p["first_line"]["p50"]),
                c.ms(p["open"]["p50"]),
                c.ms(p["execute"]["p50"]),
                c.ms(p["close"]["p50"]),
                c.ms(p["end_to_end"]["p50"]),
                c.times(q["end_to_end_vs_docker_run"]),
                c.times(q["first_line_vs_docker_run"]),
            ]
        )
    n = report["params"]["runs"]
    return c.table(
        f"a peer sandbox library on the same image, {n} runs each (ms, p50)",
        ["", "first line", "open", "execute", "close", "end to end", "e2e/docker run", "first/docker run"],
        rows,
    )


def main() -> None:
    parser = c.base_parser(__doc__ or "")
    parser.add_argument("--runs", type=int, default=10, help="measured sessions per runtime")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured sessions first, per runtime")
    parser.add_argument("--runtimes", type=c.runtimes_arg, default="runc,runsc", help="OCI runtimes")
    parser.add_argument("--version", default=DEFAULT_VERSION, help=f"the {PACKAGE} version to install")
    parser.add_argument("--venv", type=Path, help=f"use this venv, which has {PACKAGE}[docker], as it is")
    parser.add_argument("--role", choices=["peer"], help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--image", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "peer":
        with c.Workspace(root=args.root) as ws:
            rt = args.runtimes[0]
            result = llm_sandbox_runs(ws, args.image, rt, args.runs, args.warmup)
            if args.probe:
                result["probe"] = _probe(ws, args.image, rt)
        print(json.dumps(c.clean(result)))
        return

    with c.Workspace() as ws:
        known = c.available_runtimes(ws)
        image = c.policy().image
        notes = [
            f"{PACKAGE} settings on this image: runtime_configs network_mode=none, "
            "command=[sleep, infinity], init=True, runtime as the row says; "
            "skip_environment_setup=True, workdir=/tmp; code run through execute_command "
            "(see the module docstring for why each is needed)",
            f"{PACKAGE}'s container runs as root (its default) with Docker's default capabilities and a "
            "writable root file system: none of the executor's hardening",
            "first line = submit to the time.time() printed by python3 -c in the container",
        ]
        results: dict[str, Any] = {}
        ratios: dict[str, Any] = {}
        venv = install(ws, args.venv, args.version)
        if "error" in venv:
            results["install_error"] = venv["error"]
            notes.append(f"{PACKAGE} could not be installed, so it was not measured")
        else:
            results["install_s"] = venv["install_s"]
            for rt in args.runtimes:
                if rt not in known:
                    notes.append(f"{rt} skipped: the engine knows only {', '.join(known)}")
                    continue
                argv = ["--role", "peer", "--root", str(ws.root), "--image", image, "--runtimes", rt]
                argv += ["--runs", str(args.runs), "--warmup", str(args.warmup)]
                if "probe" not in results:
                    argv.append("--probe")
                # The child labels its containers with this workspace's name: this workspace removes them.
                r = results[rt] = ws.run_script(__file__, argv, timeout=900, python=venv["python"])
                if "probe" in r:
                    results["probe"] = {"runtime": rt, **r.pop("probe")}
                peer = r["peer"]
                run_p50 = r["baseline_docker_run"]["end_to_end"]["p50"]
                ratios[rt] = {
                    "end_to_end_vs_docker_run": c.ratio(peer["end_to_end"]["p50"], run_p50),
                    "first_line_vs_docker_run": c.ratio(peer["first_line"]["p50"], run_p50),
                }
            probe = dict(results.get("probe", {}))
            probe_rt = probe.pop("runtime", "")
            for name, text in probe.items():
                notes.append(f"probe on {probe_rt}, session.run(\"print('hello')\") with {name}: {text}")
        report = {
            "benchmark": "peer_sandbox",
            "machine": c.machine(ws),
            "params": {
                "runs": args.runs,
                "warmup": args.warmup,
                "runtimes": args.runtimes,
                "package": f"{PACKAGE}[docker]=={args.version}",
                "venv": str(args.venv) if args.venv else "throwaway, in the workspace",
                "image": image,
            },
            "results": results,
            "ratios": ratios,
            "notes": notes,
        }
    c.emit(args, report, render)


if __name__ == "__main__":
    c.entry(main)
