"""One task from its selection to its ledger row: batch after batch, with its mailbox and events.

:meth:`executor.runner.Executor.run` checks the task and decides its data
selection (:mod:`executor.task.plan`); a :class:`TaskRun` then carries it out.
The task's mailbox (channel, keys, quota) and its directory (with the bundle)
live as long as the task; each batch runs in a fresh sandbox whose data view
holds only that batch's files (:mod:`executor.task.batch`), and commits to the
project database when it ends (:mod:`executor.task.ledger`). A batch that does
not end OK stops the task there, so the next run with ``run_on_new_data_only``
starts at the first uncommitted batch.

Typed events (:mod:`executor.hooks`) go to the executor's hooks as they
happen, through :mod:`executor.task.eventflow` (steps coalesced, a total per
task); the ledger row is written at the start and completed at the end,
with the log tail its batches' output collectors share (:mod:`executor.task.output`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from executor.data.store import TaskStart
from executor.errors import ProjectDatabaseError, host_errors
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
from executor.sandbox.contract import (
    MessageType,
    batches_complete_body,
    current_batch_id_body,
    number_of_batches_body,
)
from executor.task.batch import BatchRunner
from executor.task.eventflow import TaskEvents
from executor.task.ledger import REASON_UNRECORDED, TaskLedger, batch_statistics, unrecorded
from executor.task.modeller import ReadyRelay, abort_modeller, tell_modeller
from executor.task.output import TaskOutput
from executor.task.supervisor import REASON_CANCELLED

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable
    from datetime import datetime
    from pathlib import Path

    from executor.data.fileoutcomes import FileKind
    from executor.events import ProgressUpdate
    from executor.policy import IsolationPolicy
    from executor.spec import TaskSpec
    from executor.task.bundle import Bundle
    from executor.task.host import TaskHost
    from executor.task.plan import Plan
    from executor.task.taskdir import TaskDir
    from executor.task.warmpool import WarmPool

log = logging.getLogger(__name__)

HOOK_DRAIN_S = 5.0
"""How long, at a task's end, hooks get to take the events still queued for them."""


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
    _completed: int = 0
    _failed_saved: dict[str, str] = field(default_factory=dict, repr=False)
    _events: TaskEvents | None = field(default=None, repr=False)
    _batches: BatchRunner | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.output = TaskOutput(batched=self.spec.batched)
        """What the task's batches' output collectors share: rate, totals, the ledger's tail."""
        self.ledger = TaskLedger(
            self.host.db, self.spec, self.task_id, self.task_hash, self.policy, self.plan
        )

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
        events = self._events = TaskEvents(
            HookDispatcher(self.host.hooks), self.context, on_progress=self.on_progress
        )
        self._batches = BatchRunner(
            host=self.host,
            spec=self.spec,
            task_id=self.task_id,
            policy=self.policy,
            secrets=self.secrets,
            bundle=self.bundle,
            data_dir=self.data_dir,
            workspace=self.workspace,
            events=events,
            output=self.output,
            rows=self.ledger.rows,
            cancel=self.cancel,
            pool=self.pool,
        )
        started = ended = False
        try:
            self.ledger.start(
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
                self._end_ledger(outcome.status, outcome.error, outcome.timings)
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
                try:
                    self._end_ledger(gave_up.status, gave_up.error, {})
                except Exception:
                    log.exception("task %s: could not close its ledger row", self.task_id)
                self._emit(TaskEnded(task=self.context, outcome=gave_up))
            raise
        finally:
            stats = events.close(HOOK_DRAIN_S)
            log.debug("task %s: hooks: %s", self.task_id, stats)

    def release(self) -> None:
        """Give back what the task held beyond its containers (its uid lease); safe twice."""
        if self._batches is not None:
            self._batches.release()

    def _end_ledger(self, status: Status, error: ErrorDetail | None, timings: dict[str, float]) -> None:
        self.ledger.end(status, error, timings, self._completed, self.output.tail())

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
        relay = ReadyRelay()
        try:
            broker.watch_ready(relay.modeller_ready)
            return self._each_batch(broker, relay)
        except BaseException as exc:
            # The engine or the host failed us mid-task: the modeller hears of it too.
            gave_up = _gave_up(self.task_id, self.policy.runtime, exc)
            assert gave_up.error is not None
            abort_modeller(broker, self.task_id, gave_up.error.type, gave_up.error)
            if self.spec.batched:
                tell_modeller(
                    broker, self.task_id, MessageType.BATCHES_COMPLETE, batches_complete_body("FAILED")
                )
            raise
        finally:
            broker.close()

    def _each_batch(self, broker: MailboxBroker, relay: ReadyRelay) -> Outcome:
        plan = self.plan
        batched = self.spec.batched
        batches = self._batches
        assert batches is not None
        total = len(plan.batches)
        if batched:
            tell_modeller(broker, self.task_id, MessageType.NUMBER_OF_BATCHES, number_of_batches_body(total))
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
                abort_modeller(broker, self.task_id, REASON_CANCELLED, last.error)
                break
            if batched:
                tell_modeller(
                    broker, self.task_id, MessageType.CURRENT_BATCH_ID, current_batch_id_body(number)
                )
            done = batches.run(number, batch, broker, relay)
            last = done.outcome
            for phase, seconds in done.outcome.timings.items():
                timings[phase] = timings.get(phase, 0.0) + seconds
            files.update(done.files)
            try:
                rows = self.ledger.commit(number, batch, done)
            except ProjectDatabaseError as exc:
                # What ran can no longer be recorded: stop here, and say so.
                log.error("task %s: batch %d could not be committed: %s", self.task_id, number, exc)
                done.outcome = last = unrecorded(done.outcome, number, exc)
                abort_modeller(broker, self.task_id, REASON_UNRECORDED, last.error)
            else:
                if self.host.db is not None and not self.spec.flags.test_run:
                    self._failed_saved.update(done.failed)
                if rows:
                    # A hook that wants the rows reads them: db.results(project, task_id=..., batch=...).
                    self._emit(ResultsSaved(task=self.context, batch=number, rows=rows))
                saved_rows += rows
            self._emit(
                BatchRun(
                    task=self.context,
                    datasource_name=self.spec.datasource_name,
                    statistics=batch_statistics(batch, done),
                    batch_number=number,
                    total_batches=total,
                )
            )
            results.append(done.outcome.result)
            if not done.outcome.ok:
                break
            self._completed += 1
        if batched:
            state = "SUCCESS" if self._completed == total else "FAILED"
            tell_modeller(broker, self.task_id, MessageType.BATCHES_COMPLETE, batches_complete_body(state))
        if self._failed_saved:
            self._emit(FailedFilesSaved(task=self.context, files=dict(self._failed_saved)))
        assert last is not None  # plan_batches always gives at least one batch
        return dataclasses.replace(
            last,
            result=(results if batched else last.result) if last.ok else None,
            timings=timings,
            files=files,
            selection=plan.selection.counts(),
            batches=(
                {"total": total, "completed": self._completed, "size": plan.batch_size} if batched else None
            ),
            saved_rows=saved_rows,
            task_hash=self.task_hash,
            warm_starts=batches.warm_starts,
        )


def _gave_up(task_id: str, runtime: str, exc: BaseException) -> Outcome:
    """How a task ended that the parent gave up on (the engine or host failed, or a second Ctrl-C)."""
    status = Status.CANCELLED if isinstance(exc, KeyboardInterrupt) else Status.ERROR
    message = str(exc)[:1000] or "interrupted"
    return Outcome(task_id, status, runtime=runtime, error=ErrorDetail(type(exc).__name__, message))
