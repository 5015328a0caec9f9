"""Result rows: the parent's memory and the project database's write lock while a task saves 32 MiB of rows.

The third red team found that 32 MiB of result rows cost the parent about
0.9 GiB of RSS, and that the one transaction committing them held the
database's write lock for 2.3 s, pushing another task's commits to 9.2 s.
Each row below runs in a fresh interpreter of its own, whose peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before the rows
flow) is its own, while another process (the "other task") commits a small
write transaction to the same database every 50 ms and times each, waiting
for the lock included.

- ``in-process, all at the end`` (baseline, same run): the pre-v4 parent path
  replayed with the same row checks and SQL: every call's row texts kept, then
  at the batch's end parsed, re-serialised and inserted in one transaction.
- ``in-process, streamed``: each call through ``TaskSession.save_results`` into
  ``ProjectDatabase.stage_rows`` (one short transaction a call, unseen), then
  ``commit_batch``, which makes them seen.
- ``container, streamed``: a real sandbox (``bench/protocols/rows``) saves them
  through ``Executor`` with a project database (gRPC, protobuf and all).
- ``container, all at the end`` (with ``--baseline-ref REF``): the same task
  through the executor of git ``REF`` (its ``executor/`` package exported with
  ``git archive`` into a temporary directory; nothing in the repository is
  written), e.g. ``fefc375``, the last commit before rows streamed.

"hold" is the longest call that held or waited for the write lock on the
parent's side: the one transaction of the baseline; for streamed rows the
longest ``stage_rows`` call and the ``commit_batch`` call (each opens and
checks its connection too, so the lock itself is held for less).

    .venv/bin/python bench/result_rows.py [--mib 32] [--row-bytes 1024] [--runtime runc]
        [--baseline-ref REF] [--no-container] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import _common as c

WRITER_PERIOD_S = 0.05
ROWS_PER_CALL = 1000

sys.path.insert(0, str(c.PROTOCOLS / "rows"))
from protocol import make_row  # noqa: E402  (the rows the container protocol makes, made here too)


# -- memory -----------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakRss:
    """This process's peak RSS growth over a block: ``VmHWM`` is reset at its start."""

    def __enter__(self) -> PeakRss:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux 4.0+)
        self.before_mib = _status_kib("VmRSS") / 1024
        return self

    def __exit__(self, *exc: object) -> None:
        self.peak_mib = _status_kib("VmHWM") / 1024
        self.growth_mib = self.peak_mib - self.before_mib


# -- rows as a protocol makes them ------------------------------------------------------------
def row_calls(mib: float, row_bytes: int, columns: int) -> Any:
    """Fresh row texts as bench/protocols/rows makes them, a call (1000 rows, 1 MiB) at a time."""
    total = int(mib * c.MiB)
    saved = rows = 0
    while True:
        call: list[str] = []
        size_of_call = 0
        while len(call) < ROWS_PER_CALL:
            text = json.dumps(make_row(rows, row_bytes, columns), separators=(",", ":"))
            if saved + len(text) > total or size_of_call + len(text) > c.MiB:
                break
            call.append(text)
            saved += len(text)
            size_of_call += len(text)
            rows += 1
        if not call:
            return
        yield call


# -- the other task: small commits, timed -------------------------------------------------------
def role_writer(db: Path, ready: Path, stop: Path, out: Path) -> dict[str, Any]:
    """Commit a small row every WRITER_PERIOD_S until ``stop`` exists, timing each (lock wait included)."""
    conn = sqlite3.connect(db, timeout=120, isolation_level=None)
    latencies: list[float] = []
    n = 0
    try:
        while not stop.exists():
            t = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "INSERT INTO processed_files (project, task_hash, name, size, mtime_ns, task_id,"
                " processed_at) VALUES ('bench-other-task', 'w', ?, 1, 1, 'other-task', '')",
                (f"f{n}",),
            )
            conn.execute("COMMIT")
            latencies.append(time.perf_counter() - t)
            n += 1
            if n == 1:
                ready.touch()
            time.sleep(WRITER_PERIOD_S)
    finally:
        conn.close()
    result = {"commits": len(latencies), "max_s": max(latencies, default=0.0), "latencies": latencies}
    out.write_text(json.dumps(result))
    return {"commits": len(latencies)}


class OtherTask:
    """The writer process around a measurement; its latencies once stopped."""

    def __init__(self, db: Path, work: Path) -> None:
        self.ready, self.stop, self.out = work / "writer.ready", work / "writer.stop", work / "writer.json"
        argv = ["--role", "writer", "--db", str(db), "--work", str(work)]
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], cwd=c.REPO)

    def __enter__(self) -> OtherTask:
        deadline = time.monotonic() + 60
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the other task's writer did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.touch()
        try:
            self.proc.wait(60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()

    def result(self) -> dict[str, Any]:
        data = json.loads(self.out.read_text())
        lat = data.pop("latencies")
        return {**data, "p50_s": c.percentile(lat, 50), "p99_s": c.percentile(lat, 99)}


# -- in-process: the pre-v4 path, replayed ------------------------------------------------------
def _task_row(conn: sqlite3.Connection, task_id: str) -> None:
    conn.execute(
        "INSERT INTO tasks (task_id, task_hash, project, modeller, datasource, bundle_sha256, policy_json,"
        " runtime, status, started_at, total_batches) VALUES (?, 'h', 'bench', 'm', 'd', 'b', '{}', 'runc',"
        " 'RUNNING', ?, 1)",
        (task_id, datetime.now(UTC).isoformat()),
    )


def role_inproc_baseline(work: Path, mib: float, row_bytes: int, columns: int) -> dict[str, Any]:
    """Rows kept in the parent, then parsed, re-serialised and inserted in one transaction (pre-v4)."""
    from executor.data.resultrows import check_row
    from executor.data.sqlite import schema

    db = work / "pod.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    for script in schema.MIGRATIONS[:3]:  # the schema the all-at-the-end code wrote
        conn.executescript(script)
    conn.execute("PRAGMA user_version = 3")
    _task_row(conn, "t")
    with OtherTask(db, work) as other, PeakRss() as rss:
        t0 = time.perf_counter()
        kept: list[str] = []
        for call in row_calls(mib, row_bytes, columns):  # what the session kept, call by call
            for text in call:
                check_row(text)
            kept.extend(call)
        rows = [json.loads(text) for text in kept]  # saved_results() at the batch's end
        texts = [json.dumps(r, sort_keys=True, allow_nan=False, separators=(",", ":")) for r in rows]
        now = datetime.now(UTC).isoformat()
        t = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO results (project, task_hash, task_id, batch, row_json, created_at)"
            " VALUES ('bench', 'h', 't', 1, ?, ?)",
            [(text, now) for text in texts],
        )
        conn.execute(
            "INSERT INTO batches VALUES ('t', 1, 'bench', 'h', 1, 0, 0, 0, ?, ?, ?, '{}')",
            (len(texts), now, now),
        )
        conn.execute("UPDATE tasks SET batches_done = 1 WHERE task_id = 't'")
        conn.execute("COMMIT")
        hold = time.perf_counter() - t
        wall = time.perf_counter() - t0
    conn.close()
    return {
        "rows": len(texts),
        "rss_growth_mib": rss.growth_mib,
        "hold_max_s": hold,
        "commit_s": hold,
        "wall_s": wall,
        "other": other.result(),
    }


# -- in-process: streamed ------------------------------------------------------------------------
def role_inproc_streamed(work: Path, mib: float, row_bytes: int, columns: int) -> dict[str, Any]:
    """Each call through a real TaskSession into ProjectDatabase.stage_rows, then commit_batch."""
    from executor.data.resultrows import TaskRows
    from executor.data.scan import FileStamp  # noqa: F401  (BatchCommit's annotations)
    from executor.data.sqlite import ProjectDatabase
    from executor.data.store import BatchCommit, TaskStart
    from executor.mailbox.broker import MailboxBroker
    from executor.mailbox.crypto import TaskKeys
    from executor.mailbox.transport import Route
    from executor.policy import IsolationPolicy
    from executor.rpc.session import TaskSession
    from executor.testing import InMemoryTransport
    from executor.v1 import sandbox_pb2 as pb

    state = work / "state"
    state.mkdir(mode=0o700)
    db = ProjectDatabase(state / "pod.db")
    started = datetime.now(UTC)
    db.start_task(
        TaskStart(
            task_id="t",
            task_hash="h",
            project="bench",
            modeller="m",
            datasource="d",
            bundle_sha256="b",
            policy={},
            runtime="runc",
            started_at=started,
            selection={},
            total_batches=1,
            test_run=False,
        )
    )
    stage_s: list[float] = []

    def store(batch: int, rows: list[str]) -> None:
        t = time.perf_counter()
        db.stage_rows("t", batch, rows)
        stage_s.append(time.perf_counter() - t)

    policy = IsolationPolicy.hardened()
    spool = work / "spool"
    spool.mkdir()
    transport = InMemoryTransport(spool_dir=spool)
    route = Route("t")
    broker = MailboxBroker(
        route,
        transport.open(route),
        TaskKeys.generate(),
        work / "broker",
        max_message_bytes=c.MiB,
        max_task_bytes=c.MiB,
    )
    rows = TaskRows(max_rows=policy.max_rows, max_bytes=policy.max_rows_bytes, store=store).batch(1)
    session = TaskSession("t", pb.TaskConfig(task_id="t"), broker, max_result_bytes=1024, rows=rows)
    try:
        with OtherTask(state / "pod.db", work) as other, PeakRss() as rss:
            t0 = time.perf_counter()
            for call in row_calls(mib, row_bytes, columns):
                session.save_results(call)
            saved = rows.seal()
            t = time.perf_counter()
            db.commit_batch(
                BatchCommit(
                    task_id="t",
                    project="bench",
                    task_hash="h",
                    batch=1,
                    total_batches=1,
                    processed=[],
                    failed=[],
                    record_processed=True,
                    started_at=started,
                    ended_at=datetime.now(UTC),
                    stats={},
                )
            )
            commit = time.perf_counter() - t
            wall = time.perf_counter() - t0
    finally:
        broker.close()
        transport.close()
    assert len(db.results("bench", task_id="t", limit=saved + 1)) == saved
    return {
        "rows": saved,
        "rss_growth_mib": rss.growth_mib,
        "hold_max_s": max([commit, *stage_s]),
        "stage_max_s": max(stage_s, default=0.0),
        "stage_total_s": sum(stage_s),
        "commit_s": commit,
        "wall_s": wall,
        "other": other.result(),
    }


# -- through a real sandbox ------------------------------------------------------------------------
def role_container(work: Path, mib: float, row_bytes: int, columns: int, runtime: str) -> dict[str, Any]:
    """A real task saves the rows through Executor (this checkout's, or the one on sys.path first)."""
    import executor
    from executor import ProjectDatabase  # the public name: the same in every version
    from executor.spec import TaskSpec

    class TimedDatabase(ProjectDatabase):
        """Times each call that writes rows or commits a batch (both versions have commit_batch)."""

        commits: ClassVar[list[float]] = []
        stages: ClassVar[list[float]] = []

        def commit_batch(self, commit: Any) -> Any:
            t = time.perf_counter()
            try:
                return super().commit_batch(commit)
            finally:
                self.commits.append(time.perf_counter() - t)

        def stage_rows(self, *args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return super().stage_rows(*args, **kwargs)  # type: ignore[misc]
            finally:
                self.stages.append(time.perf_counter() - t)

    state = work / "state"
    state.mkdir(mode=0o700)
    with c.Workspace(root=work) as ws:
        db = TimedDatabase(state / "pod.db")
        ex = ws.executor(c.policy(runtime), db=db)
        (work / "instance").write_text(ex.instance_id)
        data = ws.data_dir()
        protocol = c.PROTOCOLS / "rows"

        def spec(size: float) -> Any:
            return TaskSpec(
                protocol_dir=protocol,
                data_dir=data,
                project_id="bench",
                task_id=c.new_task_id("rows"),
                parameters={"mib": size, "row_bytes": row_bytes, "columns": columns},
            )

        c.check_ok(ws.run(ex, spec(0.01)).wait(120), "warm-up")  # imports, first container
        db.commits.clear()
        db.stages.clear()
        with OtherTask(state / "pod.db", work) as other, PeakRss() as rss:
            t0 = time.perf_counter()
            outcome = ws.run(ex, spec(mib)).wait(900)
            wall = time.perf_counter() - t0
        c.check_ok(outcome, "result rows")
    return {
        "executor": str(Path(executor.__file__).parent),
        "rows": outcome.saved_rows,
        "rss_growth_mib": rss.growth_mib,
        "hold_max_s": max([*db.commits, *db.stages], default=0.0),
        "stage_max_s": max(db.stages, default=float("nan")),
        "stage_total_s": sum(db.stages),
        "commit_s": max(db.commits, default=float("nan")),
        "wall_s": wall,
        "other": other.result(),
    }


# -- the parent ------------------------------------------------------------------------------------
def _child(ws: c.Workspace, argv: list[str], executor_from: Path | None = None) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="rows-", dir=ws.root))
    argv = [*argv, "--work", str(work)]
    if executor_from is not None:
        argv += ["--executor-from", str(executor_from)]
    result = ws.run_script(__file__, argv, timeout=1800)
    if (work / "instance").exists():
        ws.adopt_instance_file(work / "instance")
    return result


def _export(ws: c.Workspace, ref: str) -> Path:
    """``executor/`` of git ``ref``, exported (read-only on the repository) under the workspace."""
    target = ws.root / f"executor-{ref}"
    target.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(c.REPO), "archive", ref, "executor"], capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def render(report: dict[str, Any]) -> str:
    p = report["params"]
    rows = []
    for name, r in report["results"].items():
        if r is None:
            continue
        o = r["other"]
        rows.append(
            [
                name,
                r["rows"],
                c.num(r["rss_growth_mib"], 0),
                c.ms(r["hold_max_s"]),
                c.ms(r["commit_s"]),
                c.ms(o["p50_s"]),
                c.ms(o["p99_s"]),
                c.ms(o["max_s"]),
                c.num(r["wall_s"], 2),
            ]
        )
    headers = [
        "path",
        "rows",
        "peak RSS growth MiB",
        "longest hold",
        "batch commit",
        "other p50",
        "other p99",
        "other max",
        "wall s",
    ]
    shape = f"{p['columns']} integer columns" if p["columns"] > 1 else f"about {p['row_bytes']} bytes"
    out = [c.table(f"{p['mib']} MiB of result rows of {shape}", headers, rows)]
    ratios = [[k, c.times(v)] for k, v in report["ratios"].items()]
    if ratios:
        out.append(c.table("streamed / all at the end", ["figure", "ratio"], ratios))
    for note in report.get("notes", []):
        out.append(f"note: {note}")
    return "\n\n".join(out)


def main() -> None:
    parser = c.base_parser(__doc__ or "")
    parser.add_argument("--mib", type=float, default=32.0, help="MiB of row JSON the task saves")
    parser.add_argument("--row-bytes", type=int, default=1024, help="about how large each row is")
    parser.add_argument(
        "--columns", type=int, default=1, help="rows of this many small integer columns (1: one long string)"
    )
    parser.add_argument("--runtime", default="runc", help="the runtime of the container rows")
    parser.add_argument(
        "--baseline-ref", default=None, help="git ref whose executor is the container baseline"
    )
    parser.add_argument("--no-container", action="store_true", help="only the in-process rows (no Docker)")
    parser.add_argument(
        "--role",
        choices=["writer", "inproc-baseline", "inproc-streamed", "container"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--db", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--executor-from", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.executor_from is not None:
        sys.path.insert(0, str(args.executor_from))  # ahead of this checkout's editable install
    if args.role == "writer":
        w = args.work
        role_writer(args.db, w / "writer.ready", w / "writer.stop", w / "writer.json")
        return
    if args.role is not None:
        roles = {
            "inproc-baseline": lambda: role_inproc_baseline(
                args.work, args.mib, args.row_bytes, args.columns
            ),
            "inproc-streamed": lambda: role_inproc_streamed(
                args.work, args.mib, args.row_bytes, args.columns
            ),
            "container": lambda: role_container(
                args.work, args.mib, args.row_bytes, args.columns, args.runtime
            ),
        }
        print(json.dumps(roles[args.role]()))
        return

    common = [
        *("--mib", str(args.mib), "--row-bytes", str(args.row_bytes), "--columns", str(args.columns)),
        *("--runtime", args.runtime),
    ]
    results: dict[str, Any] = {}
    notes: list[str] = []
    with c.Workspace() as ws:
        results["in-process, all at the end"] = _child(ws, ["--role", "inproc-baseline", *common])
        results["in-process, streamed"] = _child(ws, ["--role", "inproc-streamed", *common])
        if not args.no_container:
            if args.runtime not in c.available_runtimes(ws):
                notes.append(f"the engine does not know runtime {args.runtime}: no container rows")
            else:
                if args.baseline_ref:
                    old = _export(ws, args.baseline_ref)
                    results[f"container, all at the end ({args.baseline_ref})"] = _child(
                        ws, ["--role", "container", *common], executor_from=old
                    )
                else:
                    notes.append("no --baseline-ref: no container row for the all-at-the-end code")
                results["container, streamed"] = _child(ws, ["--role", "container", *common])
        machine = c.machine(ws)

    def ratio_of(streamed: str, baseline: str) -> dict[str, float]:
        s, b = results.get(streamed), results.get(baseline)
        if s is None or b is None:
            return {}
        return {
            f"{streamed.split(',')[0]}: peak RSS growth": c.ratio(s["rss_growth_mib"], b["rss_growth_mib"]),
            f"{streamed.split(',')[0]}: longest hold": c.ratio(s["hold_max_s"], b["hold_max_s"]),
            f"{streamed.split(',')[0]}: other task's max commit": c.ratio(
                s["other"]["max_s"], b["other"]["max_s"]
            ),
        }

    ratios = ratio_of("in-process, streamed", "in-process, all at the end")
    if args.baseline_ref:
        ratios |= ratio_of("container, streamed", f"container, all at the end ({args.baseline_ref})")
    report = {
        "benchmark": "result_rows",
        "params": {
            "mib": args.mib,
            "row_bytes": args.row_bytes,
            "columns": args.columns,
            "runtime": args.runtime,
            "baseline_ref": args.baseline_ref,
            "writer_period_s": WRITER_PERIOD_S,
        },
        "results": results,
        "ratios": ratios,
        "notes": notes,
        "machine": machine,
        "load": os.getloadavg(),
    }
    c.emit(args, report, render)


if __name__ == "__main__":
    c.entry(main)
