"""Shared helpers for the benchmarks: a private workspace that is always cleaned up, stats, output.

Only the standard library is imported at module level: the ``spawn`` baselines
re-import the benchmark script in a fresh interpreter, and a heavy import here
would be charged to the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PROTOCOLS = BENCH_DIR / "protocols"
MiB = 1024 * 1024
# The image the executor runs by default (executor/policy/__init__.py DEFAULT_IMAGE), for a baseline run in an
# interpreter without the package (the peer library's venv); the others take it from the policy.
SANDBOX_IMAGE = "sandbox-executor/sandbox:latest"
# Containers a benchmark starts itself (baselines, peer libraries) carry this label, valued with the
# workspace's name, so that the workspace removes them on exit. It is not the executor's managed label:
# no executor's reaper touches them.
BENCH_LABEL = "io.sandbox-executor.bench"
# How long a cancelled task may take to end: the supervisor's cancel grace (5 s) and a margin.
CANCEL_JOIN_S = 15.0


# -- statistics -------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation; NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summary(values: Sequence[float]) -> dict[str, float]:
    """Count, p50, p90, p99, mean, min and max of ``values``."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values),
        "min": min(values),
        "max": max(values),
    }


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when either is missing or ``b`` is zero."""
    if not b or math.isnan(a) or math.isnan(b):
        return math.nan
    return a / b


def median(values: Iterable[float]) -> float:
    """The median, NaN when empty."""
    return percentile(list(values), 50)


# -- memory -------------------------------------------------------------------
def vmrss_mib(pid: str = "self") -> float:
    """Current resident set size from ``/proc/<pid>/status`` (VmRSS), in MiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return math.nan


def peak_rss_mib() -> float:
    """This process's peak RSS so far (``ru_maxrss``), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RssSampler:
    """Samples this process's VmRSS from a thread; a context manager.

    Args:
        interval_s: Time between samples.
    """

    def __init__(self, interval_s: float = 0.02) -> None:
        self.interval_s = interval_s
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while True:
            self.samples.append(vmrss_mib())
            if self._stop.wait(self.interval_s):
                return

    @property
    def peak(self) -> float:
        """The largest sample so far."""
        return max(self.samples, default=math.nan)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(vmrss_mib())


# -- tasks in threads -----------------------------------------------------------
class TaskHandle:
    """One ``Executor.run`` in a thread of its own, cancellable.

    Waiting uses an event, never ``Thread.join``: on CPython before 3.13 a
    KeyboardInterrupt that lands in ``join`` can leave a running thread
    marked as stopped, and the cleanup would then not wait for it.

    Attributes:
        submitted: ``time.time()`` just before ``Executor.run`` was called.
        returned: ``time.time()`` just after it returned (or raised).
        outcome: The outcome, once done.
        exception: What ``Executor.run`` raised, if it raised.
    """

    def __init__(self, executor: Any, spec: Any, **run_kwargs: Any) -> None:
        self.cancel = threading.Event()
        self.submitted = math.nan
        self.returned = math.nan
        self.outcome: Any = None
        self.exception: BaseException | None = None
        self.task_id = spec.task_id
        self._executor = executor
        self._spec = spec
        self._kwargs = run_kwargs
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"task-{spec.task_id}", daemon=True)

    def _run(self) -> None:
        try:
            self.submitted = time.time()
            self.outcome = self._executor.run(self._spec, cancel=self.cancel, **self._kwargs)
        except BaseException as exc:  # reported to whoever waits
            self.exception = exc
        finally:
            self.returned = time.time()
            self._finished.set()

    def start(self) -> TaskHandle:
        """Start the task's thread."""
        self._thread.start()
        return self

    def done(self) -> bool:
        """Whether ``Executor.run`` has returned."""
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> Any:
        """The outcome; re-raises what ``Executor.run`` raised.

        Raises:
            TimeoutError: The task did not end within ``timeout`` seconds.
        """
        if not self._finished.wait(timeout):
            raise TimeoutError(f"task {self.task_id} did not end within {timeout} s")
        if self.exception is not None:
            raise self.exception
        return self.outcome

    def stop(self, timeout: float = CANCEL_JOIN_S) -> None:
        """Cancel the task and wait (bounded) for the executor to clean up."""
        self.cancel.set()
        self._finished.wait(timeout)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class Workspace:
    """A private directory tree for one benchmark, and the cleanup of all it holds.

    Layout under ``root`` (``/tmp/se-XXXX``, short for socket paths)::

        run/        task directories (the executor's run_dir)
        spool/      the executor's mailbox spool; private, because reap() deletes the
                    spools of live executors with another run_dir (executor/task/reaper.py:98)
        transport/  the in-memory transport's spool
        modeller/   the local modeller's spool
        data/       a tiny datasource, 755 with 644 files (readable by every sandbox uid)

    On exit, even after Ctrl-C or SIGTERM, every running task is cancelled,
    every container carrying the label of an executor made here, or this
    workspace's ``BENCH_LABEL`` (baselines, peer libraries), is removed,
    the transports and modellers are closed, child processes are ended and
    ``root`` is deleted.

    Args:
        root: Use this existing directory instead of a new one (a child
            process of a benchmark); it is then left for its owner to remove.
    """

    def __init__(self, root: Path | None = None) -> None:
        self._owns_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="se-", dir="/tmp"))
        self.run_dir = self.root / "run"
        self.spool_dir = self.root / "spool"
        self._executors: list[Any] = []
        self._instances: list[str] = []
        self._instance_files: list[Path] = []
        self._closers: list[Callable[[], None]] = []
        self._handles: list[TaskHandle] = []
        self._processes: list[Any] = []
        self._backend: Any = None
        self._old_term: Any = None

    # -- things made here ------------------------------------------------------
    def data_dir(self) -> Path:
        """A small datasource readable by the sandbox user."""
        data = self.root / "data"
        if not data.exists():
            data.mkdir()
            (data / "records.csv").write_text("id,value\n1,10\n2,32\n")
            data.chmod(0o755)
            (data / "records.csv").chmod(0o644)
        return data

    def backend(self) -> Any:
        """One Docker backend shared by the executors made here."""
        if self._backend is None:
            from executor.backends.docker import DockerBackend

            self._backend = DockerBackend()
        return self._backend

    def executor(self, policy: Any, transport: Any = None, backend: Any = None, **options: Any) -> Any:
        """An executor with this workspace's run and spool directories; ``options`` go to ``Executor``.

        It is closed on exit (its warm pools, if any, torn down).
        """
        from executor.runner import Executor

        ex = Executor(
            backend or self.backend(),
            policy=policy,
            transport=transport,
            run_dir=self.run_dir,
            spool_dir=self.spool_dir,
            **options,
        )
        self._executors.append(ex)
        self._instances.append(ex.instance_id)
        return ex

    @property
    def label(self) -> tuple[str, str]:
        """The label (key, value) for containers a benchmark starts itself; they are removed on exit."""
        return BENCH_LABEL, self.root.name

    def adopt_instance_file(self, path: Path) -> None:
        """On exit, also sweep the containers of the executor whose instance id a child wrote to ``path``."""
        self._instance_files.append(path)

    def transport(self) -> Any:
        """An in-memory transport spooling under ``root``; closed on exit."""
        from executor.testing import InMemoryTransport

        spool = self.root / "transport"
        spool.mkdir(mode=0o700, exist_ok=True)
        transport = InMemoryTransport(spool_dir=spool)
        self._closers.append(transport.close)
        return transport

    def modeller(self, transport: Any) -> Any:
        """A local modeller on ``transport`` spooling under ``root``; closed on exit."""
        from executor.testing import LocalModeller

        spool = self.root / "modeller"
        spool.mkdir(mode=0o700, exist_ok=True)
        modeller = LocalModeller(transport, spool_dir=spool)
        self._closers.insert(0, modeller.close)
        return modeller

    def start(self, executor: Any, spec: Any, **run_kwargs: Any) -> TaskHandle:
        """Run ``spec`` in a thread; it is cancelled if the workspace closes first."""
        handle = TaskHandle(executor, spec, **run_kwargs)
        self._handles.append(handle)
        return handle.start()

    def run(self, executor: Any, spec: Any, timeout: float = 600.0, **run_kwargs: Any) -> TaskHandle:
        """Run ``spec`` to its end (in a thread, so Ctrl-C can cancel it) and return its handle."""
        handle = self.start(executor, spec, **run_kwargs)
        handle.wait(timeout)
        return handle

    def track_process(self, process: Any) -> Any:
        """End ``process`` (a multiprocessing process or Popen) on exit if still running."""
        self._processes.append(process)
        return process

    def run_script(
        self, script: str, argv: list[str], timeout: float, python: str | Path | None = None
    ) -> dict[str, Any]:
        """Run ``script`` in a fresh interpreter with ``argv``; its last stdout line is JSON.

        A fresh interpreter keeps the parent-side memory numbers clean. ``python`` names
        another interpreter (a throwaway venv's) instead of this one.
        """
        proc = self.track_process(
            subprocess.Popen(
                [str(python or sys.executable), str(Path(script).resolve()), *argv],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
        )
        out, err = proc.communicate(timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{err[-3000:]}")
        return dict(json.loads(out.strip().splitlines()[-1]))

    # -- cleanup ---------------------------------------------------------------
    def __enter__(self) -> Workspace:
        if threading.current_thread() is threading.main_thread():
            self._old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
        return self

    def __exit__(self, *exc: object) -> None:
        if threading.current_thread() is threading.main_thread():
            old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            self.close()
        finally:
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, old_int)
                signal.signal(signal.SIGTERM, self._old_term or signal.SIG_DFL)

    def close(self) -> None:
        """Cancel, sweep, close and delete everything; safe to call twice."""
        for handle in self._handles:
            handle.cancel.set()
        for handle in self._handles:
            handle.stop()
            if not handle.done():
                print(f"bench: task {handle.task_id} did not end within {CANCEL_JOIN_S:g} s", file=sys.stderr)
        for process in self._processes:
            _end_process(process)
        # Before the sweep: closing an executor tears its warm pools down (containers, directories,
        # uid leases); the sweep then removes whatever a failed close left.
        for ex in self._executors:
            try:
                ex.close()
            except Exception as exc:  # cleanup must not mask the real error
                print(f"bench: could not close executor {ex.instance_id}: {exc}", file=sys.stderr)
        self._sweep_containers()
        sweep_labelled(self.root.name)
        for close in self._closers:
            with contextlib.suppress(Exception):
                close()
        self._closers.clear()
        if self._owns_root:
            from executor.task.taskdir import remove_tree

            remove_tree(self.root)
            shutil.rmtree(self.root, ignore_errors=True)

    def _sweep_containers(self) -> None:
        for path in self._instance_files:
            with contextlib.suppress(OSError):
                self._instances.extend(path.read_text().split())
        if not self._instances:
            return
        try:
            from executor.backends import LABEL_PARENT, LABEL_TASK

            backend = self.backend()
            mine = set(self._instances)
            for container_id, labels in backend.list_managed():
                if labels.get(LABEL_PARENT) in mine:
                    print(
                        f"bench: removing leftover container {container_id[:12]} "
                        f"of task {labels.get(LABEL_TASK)}",
                        file=sys.stderr,
                    )
                    backend.remove(container_id)
        except Exception as exc:  # cleanup must not mask the real error
            print(f"bench: could not sweep containers: {exc}", file=sys.stderr)


def sweep_labelled(value: str) -> None:
    """Remove every container labelled ``BENCH_LABEL=value`` (docker CLI: no docker-py needed)."""
    try:
        found = subprocess.run(
            ["docker", "ps", "-aq", "--filter", f"label={BENCH_LABEL}={value}"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout.split()
        if found:
            print(f"bench: removing {len(found)} leftover baseline container(s)", file=sys.stderr)
            subprocess.run(["docker", "rm", "-f", *found], capture_output=True, timeout=120, check=False)
    except Exception as exc:  # cleanup must not mask the real error
        print(f"bench: could not sweep labelled containers: {exc}", file=sys.stderr)


def docker_run_argv(ws: Workspace, runtime: str, image: str = SANDBOX_IMAGE) -> list[str]:
    """``docker run --rm --network none <image> python3 -c pass`` on ``runtime``, for ``time_command``.

    Labelled (``BENCH_LABEL``) so that an interrupted run leaves nothing; ``--runtime`` names the
    OCI runtime even for the default (runc).
    """
    key, value = ws.label
    argv = ["docker", "run", "--rm", "--network", "none", "--label", f"{key}={value}", "--runtime", runtime]
    return [*argv, image, "python3", "-c", "pass"]


def time_command(argv: list[str]) -> float:
    """Seconds from just before ``argv`` starts to its exit (for ``docker run --rm``: the container removed).

    Raises:
        RuntimeError: It exited with a non-zero status.
    """
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return elapsed


def _end_process(process: Any) -> None:
    """Terminate, then kill, a child process that is still running."""
    alive = process.poll() is None if hasattr(process, "poll") else process.is_alive()
    if not alive:
        return
    process.terminate()
    try:
        if hasattr(process, "poll"):
            process.wait(CANCEL_JOIN_S)
        else:
            process.join(CANCEL_JOIN_S)
    except Exception:
        pass
    still = process.poll() is None if hasattr(process, "poll") else process.is_alive()
    if still:
        process.kill()


def entry(main: Callable[[], None]) -> None:
    """Run a benchmark's ``main``; on Ctrl-C or SIGTERM say so briefly and exit 130.

    The workspace has cleaned up by the time the interrupt gets here.
    """
    try:
        main()
    except KeyboardInterrupt:
        print("bench: interrupted; the containers and directories it made are removed", file=sys.stderr)
        sys.exit(130)


def new_task_id(prefix: str) -> str:
    """A unique, valid task id."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def policy(runtime: str = "runc", **changes: Any) -> Any:
    """The hardened policy on ``runtime``, with ``changes``."""
    from executor.policy import IsolationPolicy

    return IsolationPolicy.hardened().replace(runtime=runtime, **changes)


def available_runtimes(workspace: Workspace) -> list[str]:
    """The OCI runtimes the Docker engine knows."""
    return list(workspace.backend().runtimes())


def check_ok(outcome: Any, what: str) -> None:
    """Raise with the outcome's error unless it is OK."""
    if not outcome.ok:
        err = outcome.error
        detail = f"{err.type}: {err.message}\n{err.stderr_tail or err.traceback}" if err else ""
        raise RuntimeError(f"{what}: task ended {outcome.status.value}: {detail}")


# -- machine and output ---------------------------------------------------------
def machine(workspace: Workspace | None = None) -> dict[str, Any]:
    """What this ran on: cores, memory, Python, and the Docker engine's storage and runtimes."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "mem_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
    }
    if workspace is not None:
        try:
            engine = workspace.backend().client.info()
            info.update(
                docker=engine.get("ServerVersion"),
                cgroup=engine.get("CgroupVersion"),
                storage=engine.get("Driver"),
                runtimes=sorted(engine.get("Runtimes", {})),
                load_avg=[round(x, 2) for x in os.getloadavg()],
            )
        except Exception as exc:
            info["docker"] = f"unavailable: {exc}"
    return info


def base_parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with ``--json``."""
    parser = argparse.ArgumentParser(
        description=description.strip().splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    return parser


def runtimes_arg(text: str) -> list[str]:
    """``runc,runsc`` -> ``["runc", "runsc"]``."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    for name in names:
        if name not in ("runc", "runsc"):
            raise argparse.ArgumentTypeError(f"unknown runtime {name!r} (runc, runsc)")
    return names


def ms(seconds: float) -> str:
    """Seconds as milliseconds for a table cell."""
    if seconds is None or math.isnan(seconds):
        return "-"
    value = seconds * 1000
    size = abs(value)
    return f"{value:.3f}" if size < 1 else f"{value:.2f}" if size < 100 else f"{value:.0f}"


def num(value: float, digits: int = 2) -> str:
    """A number for a table cell."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def times(value: float) -> str:
    """A ratio for a table cell: ``12.3x``."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.1f}x" if value >= 10 else f"{value:.2f}x"


def table(title: str, headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width table."""
    body = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    out = [title, "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)), line]
    for row in body:
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        out.append("  ".join(cells))
    return "\n".join(out)


def clean(value: Any) -> Any:
    """``value`` with NaN replaced by ``None`` (JSON has no NaN) and floats rounded."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else round(value, 6)
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value


def emit(args: argparse.Namespace, report: dict[str, Any], render: Callable[[dict[str, Any]], str]) -> None:
    """Print ``report`` as JSON (``--json``) or as the text ``render`` makes of it."""
    if args.json:
        print(json.dumps(clean(report), indent=2))
        return
    m = report.get("machine", {})
    header = (
        f"# {report['benchmark']}: {m.get('cpus')} cores, {m.get('mem_gib')} GiB, Python {m.get('python')}"
    )
    if "docker" in m:
        header += (
            f", Docker {m.get('docker')}, cgroup v{m.get('cgroup')}, {m.get('storage')}, "
            f"load {m.get('load_avg')}"
        )
    print(header)
    print(render(report))
    for note in report.get("notes", []):
        print(f"note: {note}")
