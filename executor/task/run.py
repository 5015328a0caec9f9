"""One task from its selection to its ledger row: batches, containers, commits, events.

:meth:`executor.runner.Executor.run` checks the task and decides its data
selection; a :class:`TaskRun` then carries it out. The task's mailbox (channel,
keys, quota) and its directory (with the bundle) live as long as the task; each
batch gets a fresh container, token, socket and data view holding only that
batch's files. A batch's result rows go to the project database as they
arrive, unseen until the batch commits (:mod:`executor.data.resultrows`). When a
batch ends OK, its processed and failed files commit in one transaction that
also makes its rows seen; a batch that does not end OK commits only the
failures it reported, its rows are removed, and the task stops there, so the
next run with ``run_on_new_data_only`` starts at the first uncommitted batch.

Typed events (:mod:`executor.hooks`) go to the executor's hooks as they
happen, through :mod:`executor.task.eventflow` (steps coalesced, a total per
task); the ledger row is written at the start and completed at the end,
with the log tail its batches' output collectors share (:mod:`executor.task.output`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from executor.data import logtail
from executor.data.fileoutcomes import FileKind
from executor.data.projectdb import BatchCommit, TaskEnd, TaskStart
from executor.data.resultrows import STORE_WAIT_S, TaskRows
from executor.data.view import DataView, FileStamp, may_link
from executor.errors import (
    DataSourceError,
    ProjectDatabaseError,
    SandboxExecutorError,
    host_errors,
)
from executor.events import ControlKind, ProgressUpdate
from executor.hooks import (
    BatchRun,
    FailedFilesSaved,
    HookDispatcher,
    ResultsSaved,
    TaskContext,
    TaskEnded,
    TaskStarted,
)
from executor.mailbox.broker import MailboxBroker
from executor.mailbox.crypto import TaskKeys
from executor.mailbox.transport import Route
from executor.outcome import ErrorDetail, Outcome, Status
from executor.policy import IsolationPolicy
from executor.rpc import serde
from executor.rpc.session import TaskSession
from executor.sandbox.contract import SANDBOX_DATA
from executor.spec import TaskSpec
from executor.task.assembly import Assembly, assemble
from executor.task.bundle import Bundle, link_bundle
from executor.task.eventflow import TaskEvents
from executor.task.output import OutputCollector, TaskOutput
from executor.task.supervisor import REASON_CANCELLED, HandOverFailed, Supervisor, abort_message
from executor.task.taskdir import TaskDir
from executor.task.uids import UidLease
from executor.task.warmpool import Slot, WarmPool

if TYPE_CHECKING:
    from executor.task.admission import Permit
    from executor.task.host import TaskHost
    from executor.task.plan import Plan

log = logging.getLogger(__name__)

HOOK_DRAIN_S = 5.0
"""How long, at a task's end, hooks get to take the events still queued for them."""
OUTPUT_DRAIN_S = 2.0
"""How long, after its container is gone, a batch's output may take to arrive."""
MAX_HANDOVERS = 3
"""Warm slots one batch tries before it starts cold: each that fails is destroyed, nothing of the task ran."""


class _ReadyRelay:
    """Passes the modeller's readiness to whichever batch's sandbox is current."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._session: TaskSession | None = None

    def modeller_ready(self) -> None:
        with self._lock:
            self._ready = True
            session = self._session
        if session is not None:
            session.send_control(ControlKind.MODELLER_READY)

    def attach(self, session: TaskSession | None) -> None:
        with self._lock:
            self._session = session
            ready = self._ready
        if ready and session is not None:
            session.send_control(ControlKind.MODELLER_READY)


@dataclass
class _BatchResult:
    outcome: Outcome
    rows: int  # result rows stored (unseen until the batch commits)
    files: dict[str, tuple[FileKind, str]]
    missing: frozenset[str]
    started_at: datetime
    ended_at: datetime


@dataclass
class TaskRun:
    """Carries out one planned task on ``host``; made and run by :meth:`Executor.run`."""

    host: TaskHost
    spec: TaskSpec
    task_id: str
    task_hash: str
    policy: IsolationPolicy
    secrets: dict[str, str]
    bundle: Bundle
    data_dir: Path
    plan: Plan
    workspace: TaskDir
    started_at: datetime
    cancel: threading.Event | None = None
    on_progress: Callable[[ProgressUpdate], None] | None = None
    pool: WarmPool | None = None
    _lease: UidLease | None = field(default=None, repr=False)
    _warm_ok: bool = True
    _cold_started: bool = False
    _batch: int = 0
    _warm_starts: int = 0
    _output: TaskOutput | None = field(default=None, repr=False)
    _completed: int = 0
    _failed_saved: dict[str, str] = field(default_factory=dict, repr=False)
    _events: TaskEvents | None = field(default=None, repr=False)
    _rows: TaskRows | None = field(default=None, repr=False)

    def _task_rows(self) -> TaskRows:
        """The task's result rows across its batches: its caps, and the database they stream to."""
        if self._rows is None:
            db = self.host.db
            store = None
            if db is not None:
                wait = min(db.busy_timeout_s, STORE_WAIT_S)

                def store(batch: int, rows: list[str]) -> None:
                    db.stage_rows(self.task_id, batch, rows, timeout_s=wait)

            self._rows = TaskRows(
                max_rows=self.policy.max_rows,
                max_bytes=self.policy.max_rows_bytes,
                store=store,
                task_id=self.task_id,
            )
        return self._rows

    @property
    def context(self) -> TaskContext:
        """Who the task's events are about."""
        return TaskContext(
            task_id=self.task_id,
            task_hash=self.task_hash,
            project=self.spec.project_id,
            modeller=self.spec.modeller_name,
            datasource=self.spec.datasource_name,
        )

    def _emit(self, event: Any) -> None:
        if self._events is not None:
            self._events.emit(event)

    def run(self) -> Outcome:
        """Every batch in turn, until one does not end OK; the ledger and hooks hear of all."""
        db = self.host.db
        self._events = TaskEvents(HookDispatcher(self.host.hooks), self.context, on_progress=self.on_progress)
        started = ended = False
        try:
            if db is not None:
                db.start_task(
                    TaskStart(
                        task_id=self.task_id,
                        task_hash=self.task_hash,
                        project=self.spec.project_id,
                        modeller=self.spec.modeller_name,
                        datasource=self.spec.datasource_name,
                        bundle_sha256=self.bundle.sha256,
                        policy=self.policy.describe(),
                        runtime=self.policy.runtime,
                        started_at=self.started_at,
                        selection=self.plan.selection.counts(),
                        total_batches=len(self.plan.batches),
                        test_run=self.spec.flags.test_run,
                        owner=self.host.instance_id,
                    )
                )
            started = True
            self._emit(
                TaskStarted(
                    task=self.context,
                    selection=self.plan.selection.counts(),
                    total_batches=len(self.plan.batches),
                    runtime=self.policy.runtime,
                )
            )
            outcome = self._run_batches()
            ended = True
            try:
                self._end(outcome)
            except ProjectDatabaseError as exc:
                # The task ran and its outcome stands; only its ledger row is lost.
                log.error("task %s: could not close its ledger row: %s", self.task_id, exc)
            self._emit(TaskEnded(task=self.context, outcome=outcome))
            return outcome
        except BaseException as exc:
            if started and not ended:
                # The ledger never keeps a task RUNNING that this process gave up on
                # (an interrupt is the operator's second Ctrl-C), and hooks hear the end.
                gave_up = _gave_up(self.task_id, self.policy.runtime, exc)
                error = gave_up.error
                assert error is not None
                try:
                    self._end_ledger(gave_up.status, error.type, error.message, {}, self._completed)
                except Exception:
                    log.exception("task %s: could not close its ledger row", self.task_id)
                self._emit(TaskEnded(task=self.context, outcome=gave_up))
            raise
        finally:
            stats = self._events.close(HOOK_DRAIN_S)
            log.debug("task %s: hooks: %s", self.task_id, stats)

    # -- batches ---------------------------------------------------------------
    def _run_batches(self) -> Outcome:
        spec = self.spec
        host = self.host
        route = Route(
            self.task_id,
            spec.pod_identifier,
            spec.modeller_name,
            tuple(p for p in spec.pod_identifiers if p != spec.pod_identifier),
        )
        spool = host.spool_dir / self.workspace.path.name
        channel = host.transport.open(route)
        try:
            with host_errors("make the mailbox spool", spool):
                broker = MailboxBroker(
                    route,
                    channel,
                    spec.keys or TaskKeys.generate(),
                    spool,
                    max_message_bytes=self.policy.max_message_bytes,
                    max_task_bytes=self.policy.max_task_bytes,
                    owner=host.instance_id,
                )
        except BaseException:
            channel.close()
            raise
        relay = _ReadyRelay()
        try:
            broker.watch_ready(relay.modeller_ready)
            return self._each_batch(broker, relay)
        except BaseException as exc:
            # The engine or the host failed us mid-task: the modeller hears of it too.
            gave_up = _gave_up(self.task_id, self.policy.runtime, exc)
            assert gave_up.error is not None
            self._abort_modeller(broker, gave_up.error.type, gave_up.error)
            if self.plan.batched:
                self._tell_modeller(broker, "BATCHES_COMPLETE", {"state": "FAILED"})
            raise
        finally:
            broker.close()

    def _each_batch(self, broker: MailboxBroker, relay: _ReadyRelay) -> Outcome:
        plan = self.plan
        total = len(plan.batches)
        if plan.batched:
            self._tell_modeller(broker, "NUMBER_OF_BATCHES", {"number_of_batches": total})
        results: list[Any] = []
        files: dict[str, tuple[FileKind, str]] = {}
        timings: dict[str, float] = {}
        saved_rows = 0
        last: Outcome | None = None
        for number, batch in enumerate(plan.batches, start=1):
            if self.cancel is not None and self.cancel.is_set():
                last = Outcome(
                    self.task_id,
                    Status.CANCELLED,
                    runtime=self.policy.runtime,
                    error=ErrorDetail(
                        "Cancelled",
                        f"the task was cancelled by the operator before batch {number} of {total}",
                    ),
                )
                self._abort_modeller(broker, REASON_CANCELLED, last.error)
                break
            self._batch = number
            if plan.batched:
                self._tell_modeller(broker, "CURRENT_BATCH_ID", {"batch_id": number})
            done = self._run_one(number, batch, broker, relay)
            last = done.outcome
            for phase, seconds in done.outcome.timings.items():
                timings[phase] = timings.get(phase, 0.0) + seconds
            files.update(done.files)
            failed = {n: r for n, (k, r) in done.files.items() if k is FileKind.FAILED}
            try:
                saved_rows += self._commit(number, batch, done, failed)
            except ProjectDatabaseError as exc:
                # What ran can no longer be recorded: stop here, and say so.
                log.error("task %s: batch %d could not be committed: %s", self.task_id, number, exc)
                done.outcome = last = _unrecorded(done.outcome, number, exc)
                self._abort_modeller(broker, REASON_UNRECORDED, last.error)
            self._emit(
                BatchRun(
                    task=self.context,
                    datasource_name=self.spec.datasource_name,
                    statistics=_batch_statistics(batch, done, failed),
                    batch_number=number,
                    total_batches=total,
                )
            )
            results.append(done.outcome.result)
            if not done.outcome.ok:
                break
            self._completed += 1
        if plan.batched:
            state = "SUCCESS" if self._completed == total else "FAILED"
            self._tell_modeller(broker, "BATCHES_COMPLETE", {"state": state})
        if self._failed_saved:
            self._emit(FailedFilesSaved(task=self.context, files=dict(self._failed_saved)))
        assert last is not None  # plan_batches always gives at least one batch
        return dataclasses.replace(
            last,
            result=(results if plan.batched else last.result) if last.ok else None,
            timings=timings,
            files=files,
            selection=plan.selection.counts(),
            batches=(
                {"total": total, "completed": self._completed, "size": plan.batch_size}
                if plan.batched
                else None
            ),
            saved_rows=saved_rows,
            task_hash=self.task_hash,
            warm_starts=self._warm_starts,
        )

    def _abort_modeller(self, broker: MailboxBroker, reason: str, error: ErrorDetail | None) -> None:
        """Tell the modeller the task ends here (once per task, see :meth:`MailboxBroker.send_abort`)."""
        if error is None:
            return
        try:
            broker.send_abort(abort_message(reason, error.type, error.message))
        except SandboxExecutorError as exc:
            log.warning("task %s: could not tell the modeller it aborted: %s", self.task_id, exc)

    def _tell_modeller(self, broker: MailboxBroker, message_type: str, body: dict[str, Any]) -> None:
        """Send the seed's batch messages; a modeller that cannot be reached does not stop the task."""
        try:
            broker.send_bytes(message_type, json.dumps(body).encode())
        except Exception as exc:  # the transport's failure is the modeller's loss, not the task's
            log.info("task %s: could not send %s to the modeller: %s", self.task_id, message_type, exc)

    def _commit(
        self, number: int, batch: tuple[FileStamp, ...], done: _BatchResult, failed: dict[str, str]
    ) -> int:
        """Commit the batch (all of it if OK, else its failures only); the rows committed.

        A test run touches no file state (neither processed nor failed), so a
        later real run sees every file as it would have without the trial.
        """
        db = self.host.db
        if db is None:
            return 0
        ok = done.outcome.ok
        trial = self.spec.flags.test_run
        stamps = {f.name: f for f in batch}
        processed = [f for f in batch if f.name not in failed and f.name not in done.missing]
        commit = BatchCommit(
            task_id=self.task_id,
            project=self.spec.project_id,
            task_hash=self.task_hash,
            batch=number,
            total_batches=len(self.plan.batches),
            processed=processed if ok and not trial else [],
            failed=[] if trial else [(stamps[n], reason) for n, reason in failed.items() if n in stamps],
            record_processed=ok and not trial,
            ok=ok,
            started_at=done.started_at,
            ended_at=done.ended_at,
            stats=_batch_statistics(batch, done, failed),
        )
        try:
            db.commit_batch(commit)
        except ProjectDatabaseError:
            if done.rows:
                self._discard_rows(number)  # it never commits: its rows are never seen
            raise
        if done.rows and not ok:
            self._discard_rows(number)
        if not trial:
            self._failed_saved.update(failed)
        rows = done.rows if ok else 0
        if rows:
            # A hook that wants the rows reads them: db.results(project, task_id=..., batch=...).
            self._emit(ResultsSaved(task=self.context, batch=number, rows=rows))
        return rows

    def _discard_rows(self, number: int) -> None:
        """Remove a batch's rows that will never be seen; they stay unseen if that fails too."""
        db = self.host.db
        assert db is not None
        try:
            db.discard_rows(self.task_id, number)
        except ProjectDatabaseError as exc:
            log.warning("task %s: the unseen result rows of batch %d stay: %s", self.task_id, number, exc)

    def _run_one(
        self, number: int, batch: tuple[FileStamp, ...], broker: MailboxBroker, relay: _ReadyRelay
    ) -> _BatchResult:
        """One batch in one fresh container (a warm slot if one is ready), whose /data holds only ``batch``.

        A warm slot that fails its hand-over ran nothing of the task: it is
        destroyed and the batch goes to another slot, or starts cold. A cold
        start waits in the host's line for a start permit (a slot that
        becomes ready meanwhile is taken instead); a cancel while it waits
        ends the batch CANCELLED with no container made.
        """
        started_at = datetime.now(UTC)
        handovers = 0
        queued_s = 0.0
        while True:
            filled = self._fill_warm_slot(batch) if handovers < MAX_HANDOVERS else None
            permit: Permit | None = None
            if filled is None:
                t = time.monotonic()
                admitted = self.host.gate.acquire(
                    cancel=self.cancel,
                    poll=(lambda: self._fill_warm_slot(batch)) if handovers < MAX_HANDOVERS else None,
                )
                queued_s += time.monotonic() - t
                if admitted is None:
                    return self._cancelled_in_line(number, started_at, queued_s)
                if isinstance(admitted, tuple):
                    filled = admitted
                else:
                    permit = admitted
            if filled is not None:
                slot, view, assign_s = filled
                try:
                    return self._serve(
                        number,
                        view,
                        broker,
                        relay,
                        started_at,
                        slot=slot,
                        assign_s=assign_s,
                        queued_s=queued_s,
                    )
                except HandOverFailed as exc:
                    handovers += 1
                    log.warning(
                        "task %s: %s; it starts elsewhere (nothing of it ran there)", self.task_id, exc
                    )
                    continue
                finally:
                    view.remove()
                    slot.discard()
            assert permit is not None
            try:
                return self._run_cold(number, batch, broker, relay, started_at, permit, queued_s)
            finally:
                permit.release()

    def _run_cold(
        self,
        number: int,
        batch: tuple[FileStamp, ...],
        broker: MailboxBroker,
        relay: _ReadyRelay,
        started_at: datetime,
        permit: Permit,
        queued_s: float,
    ) -> _BatchResult:
        """The batch in a new container of its own, under ``permit``."""
        task_dir = self.workspace
        if self._cold_started:
            with host_errors("renew the IPC directory in", task_dir.path):
                task_dir.renew()
        self._cold_started = True
        self._cold_uid()
        with host_errors("make the data view in", task_dir.path):
            view = DataView(
                task_dir.data, self.data_dir, batch, gid=self.policy.gid, method=self.host.view_method
            )
        try:
            return self._serve(number, view, broker, relay, started_at, permit=permit, queued_s=queued_s)
        finally:
            view.remove()

    def _cold_uid(self) -> int:
        """The uid the task's own containers run as: leased at its first cold batch, held to its end.

        A task that only ever runs in warm slots holds no uid but its slots'.

        Raises:
            CapacityError: Every uid of the policy's range is held by a live task.
        """
        if self._lease is None:
            self._lease = self.host.uids.lease(self.policy)
            self.workspace.sandbox_uid = self._lease.uid
        return self._lease.uid

    def release(self) -> None:
        """Give back what the task held beyond its containers (its uid lease); safe twice."""
        if self._lease is not None:
            self._lease.release()

    def _cancelled_in_line(self, number: int, started_at: datetime, queued_s: float) -> _BatchResult:
        """The batch's result when the task was cancelled while it waited for a start permit."""
        outcome = Outcome(
            self.task_id,
            Status.CANCELLED,
            runtime=self.policy.runtime,
            timings={"queued": queued_s},
            error=ErrorDetail(
                "Cancelled", "the task was cancelled by the operator while it waited for its sandbox to start"
            ),
        )
        return _BatchResult(
            outcome=outcome,
            rows=0,
            files={},
            missing=frozenset(),
            started_at=started_at,
            ended_at=datetime.now(UTC),
        )

    def _fill_warm_slot(self, batch: tuple[FileStamp, ...]) -> tuple[Slot, DataView, float] | None:
        """A ready warm slot holding the bundle and the batch's view, or ``None``: this batch starts cold.

        A slot's data directory is already mounted, so its view must be hard
        links (bind mounts cannot be added to a running container); a view
        that cannot be destroys the slot, unused, and the task's batches
        start cold from then on.
        """
        host = self.host
        if (
            self.pool is None
            or not self._warm_ok
            or host.view_method == "bind"
            or not may_link(host.run_dir, self.data_dir)
        ):
            return None
        slot = self.pool.take()
        if slot is None:
            return None
        t = time.monotonic()
        try:
            with host_errors("fill the warm slot", slot.task_dir.path):
                link_bundle(self.bundle, slot.task_dir.protocol)
                view = DataView(
                    slot.task_dir.data,
                    self.data_dir,
                    batch,
                    gid=self.policy.gid,
                    method="hardlink",
                    existing=True,
                )
        except DataSourceError as exc:
            log.info("task %s: starts cold: its data view cannot be hard links (%s)", self.task_id, exc)
            self._warm_ok = False
            slot.discard()
            return None
        except BaseException:
            slot.discard()
            raise
        return slot, view, time.monotonic() - t

    def _serve(
        self,
        number: int,
        view: DataView,
        broker: MailboxBroker,
        relay: _ReadyRelay,
        started_at: datetime,
        *,
        slot: Slot | None = None,
        assign_s: float = 0.0,
        permit: Permit | None = None,
        queued_s: float = 0.0,
    ) -> _BatchResult:
        """Serve one batch's sandbox until its container is gone: a new one, or ``slot`` given the task.

        Raises:
            HandOverFailed: ``slot`` did not take its task (nothing of it ran).
        """
        host = self.host
        task_dir = slot.task_dir if slot is not None else self.workspace
        wake = threading.Event()
        rows = self._task_rows().batch(number)
        session = TaskSession(
            self.task_id,
            serde.task_config(self.spec, self.task_id, self.bundle.sha256, self.policy, self.secrets),
            broker,
            max_result_bytes=self.policy.max_result_bytes,
            on_progress=self._progress,
            on_finish=wake.set,
            data_dir=view.path,
            rows=rows,
        )
        assembly: Assembly | None = None
        collector = OutputCollector(
            host.backend,
            self.task_id,
            on_line=lambda stream, line: self._line(number, stream, line),
            task=self.output,
            batch=number,
        )
        try:
            if slot is not None:
                container = slot.spec
            else:
                assembly = assemble(
                    task_dir,
                    session,
                    name=self.task_id,
                    project_id=self.spec.project_id,
                    instance_id=host.instance_id,
                    policy=self.policy.replace(uid=self._cold_uid()),
                    bundle_path=self.bundle.path,
                    data_mounts=view.mounts(SANDBOX_DATA),
                )
                container = assembly.spec
            relay.attach(session)
            supervisor = Supervisor(
                host.backend,
                container,
                session,
                wake,
                self.cancel,
                notify_abort=lambda reason, kind, message: broker.send_abort(
                    abort_message(reason, kind, message)
                ),
                on_start=collector.start,
                adopt=slot.container_id if slot is not None else None,
                give=(lambda: slot.give(session)) if slot is not None else None,
                permit=permit,
            )
            if queued_s:
                supervisor.timings["queued"] = queued_s
            if slot is not None:
                supervisor.timings["assign"] = assign_s
            outcome = supervisor.run()
            if slot is not None:
                self._warm_starts += 1
        finally:
            relay.attach(None)
            if assembly is not None:
                assembly.close()
            elif slot is not None:
                slot.server.stop()
            rows.seal()
            collector.stop(OUTPUT_DRAIN_S)
        return _BatchResult(
            outcome=outcome,
            rows=rows.rows,
            files=session.file_outcomes(),
            missing=view.missing,
            started_at=started_at,
            ended_at=datetime.now(UTC),
        )

    # -- events ----------------------------------------------------------------
    def _progress(self, update: ProgressUpdate) -> None:
        if self._events is not None:
            self._events.progress(update, self._batch)

    def _line(self, batch: int, stream: str, line: str) -> None:
        if self._events is not None:
            self._events.log_line(stream, line, batch)

    @property
    def output(self) -> TaskOutput:
        """What the task's batches' output collectors share: rate, totals, the ledger's tail."""
        if self._output is None:
            self._output = TaskOutput(batched=self.plan.batched)
        return self._output

    # -- the ledger --------------------------------------------------------------
    def _end(self, outcome: Outcome) -> None:
        error = outcome.error
        self._end_ledger(
            outcome.status,
            error.type if error is not None else None,
            error.message if error is not None else None,
            outcome.timings,
            self._completed,
        )

    def _end_ledger(
        self,
        status: Status,
        error_type: str | None,
        message: str | None,
        timings: dict[str, float],
        done: int,
    ) -> None:
        db = self.host.db
        if db is None:
            return
        db.end_task(
            TaskEnd(
                task_id=self.task_id,
                status=status.value,
                error_type=error_type,
                error_message=message,
                timings=dict(timings),
                ended_at=datetime.now(UTC),
                log_tail=self.output.tail(),
                log_format=logtail.FORMAT,
                batches_done=done,
                selection=self.plan.selection.counts(),
            )
        )
        if self._rows is not None and self._rows.rows:
            # Rows of a batch cut short (the engine failed, a second Ctrl-C) never commit.
            try:
                db.discard_rows(self.task_id)
            except ProjectDatabaseError as exc:
                log.warning("task %s: its unseen result rows stay: %s", self.task_id, exc)


def _gave_up(task_id: str, runtime: str, exc: BaseException) -> Outcome:
    """How a task ended that the parent gave up on (the engine or host failed, or a second Ctrl-C)."""
    status = Status.CANCELLED if isinstance(exc, KeyboardInterrupt) else Status.ERROR
    message = str(exc)[:1000] or "interrupted"
    return Outcome(task_id, status, runtime=runtime, error=ErrorDetail(type(exc).__name__, message))


REASON_UNRECORDED = "NotRecorded"
"""The TASK_ABORT reason when the parent could not commit what a batch did."""


def _unrecorded(outcome: Outcome, number: int, exc: ProjectDatabaseError) -> Outcome:
    """The batch's outcome when its commit failed: an error, since what ran is not on record."""
    return dataclasses.replace(
        outcome,
        status=Status.ERROR,
        result=None,
        error=ErrorDetail(
            "ProjectDatabaseError",
            f"batch {number} ran but could not be recorded in the project database: {exc}",
        ),
    )


def _batch_statistics(
    batch: tuple[FileStamp, ...], done: _BatchResult, failed: dict[str, str]
) -> dict[str, Any]:
    """What a batch did, for its BatchRun event and its database row."""
    return {
        "status": done.outcome.status.value,
        "files": len(batch),
        "failed": len(failed),
        "processed": len(batch) - len(failed) - len(done.missing) if done.outcome.ok else 0,
        "missing": len(done.missing),
        "rows": done.rows,
        "duration_s": (done.ended_at - done.started_at).total_seconds(),
    }
