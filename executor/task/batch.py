"""One batch in one fresh sandbox: a warm slot if one is ready, else a cold container of its own.

A warm slot that fails its hand-over ran nothing of the task: it is destroyed
and the batch goes to another slot, or starts cold. A cold start waits in the
host's line for a start permit (:mod:`executor.task.admission`); a slot that
becomes ready meanwhile is taken instead. Either way the sandbox's data view
holds only the batch's files, and the sandbox is served and supervised
(:class:`~executor.task.supervisor.Supervisor`) until its container is gone.
The uid the task's own containers run as (one no other live task has) is
leased at its first cold batch and held to the task's end: a task served only
by warm slots holds only theirs.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from executor.data.filesystem import may_link
from executor.data.view import DataView
from executor.errors import DataSourceError, host_errors
from executor.outcome import ErrorDetail, Outcome, Status
from executor.rpc import serde
from executor.rpc.session import TaskSession
from executor.sandbox.contract import SANDBOX_DATA
from executor.task.assembly import Assembly, assemble
from executor.task.bundle import link_bundle
from executor.task.ledger import BatchResult
from executor.task.output import OutputCollector
from executor.task.supervisor import HandOverFailed, Supervisor, abort_message

if TYPE_CHECKING:
    from pathlib import Path

    from executor.data.resultrows import TaskRows
    from executor.data.scan import FileStamp
    from executor.mailbox.broker import MailboxBroker
    from executor.policy import IsolationPolicy
    from executor.spec import TaskSpec
    from executor.task.admission import Permit
    from executor.task.bundle import Bundle
    from executor.task.eventflow import TaskEvents
    from executor.task.host import TaskHost
    from executor.task.modeller import ReadyRelay
    from executor.task.output import TaskOutput
    from executor.task.slot import Slot
    from executor.task.taskdir import TaskDir
    from executor.task.uids import UidLease
    from executor.task.warmpool import WarmPool

log = logging.getLogger(__name__)

OUTPUT_DRAIN_S = 2.0
"""How long, after its container is gone, a batch's output may take to arrive."""
MAX_HANDOVERS = 3
"""Warm slots one batch tries before it starts cold: each that fails is destroyed, nothing of the task ran."""


@dataclass
class BatchRunner:
    """Runs one task's batches, one at a time, each in a sandbox of its own.

    Args:
        host: The executor's side of the task.
        spec: The task.
        task_id: The task's id.
        policy: The task's policy.
        secrets: The secrets it grants, resolved.
        bundle: The parent's checked copy of the protocol (in ``workspace``).
        data_dir: The datasource directory.
        workspace: The task's own directory, for its cold batches.
        events: Where the sandboxes' progress and output lines go.
        output: What the batches' output collectors share.
        rows: The task's result rows across its batches.
        cancel: Set to cancel the task.
        pool: The warm pool of the task's policy, if it has one.
    """

    host: TaskHost
    spec: TaskSpec
    task_id: str
    policy: IsolationPolicy
    secrets: dict[str, str]
    bundle: Bundle
    data_dir: Path
    workspace: TaskDir
    events: TaskEvents
    output: TaskOutput
    rows: TaskRows
    cancel: threading.Event | None = None
    pool: WarmPool | None = None
    warm_starts: int = 0
    _lease: UidLease | None = field(default=None, repr=False)
    _warm_ok: bool = True

    def __post_init__(self) -> None:
        # What every batch's sandbox fetches: the same for all of them, so built once.
        self.config = serde.task_config(
            self.spec, self.task_id, self.bundle.sha256, self.policy, self.secrets
        )

    def run(
        self, number: int, batch: tuple[FileStamp, ...], broker: MailboxBroker, relay: ReadyRelay
    ) -> BatchResult:
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
        relay: ReadyRelay,
        started_at: datetime,
        permit: Permit,
        queued_s: float,
    ) -> BatchResult:
        """The batch in a new container of its own, under ``permit``."""
        task_dir = self.workspace
        # The task's own directory holds no IPC part until a batch starts cold.
        with host_errors("renew the IPC directory in", task_dir.path):
            task_dir.renew()
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

    def _cancelled_in_line(self, number: int, started_at: datetime, queued_s: float) -> BatchResult:
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
        return BatchResult(
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
        relay: ReadyRelay,
        started_at: datetime,
        *,
        slot: Slot | None = None,
        assign_s: float = 0.0,
        permit: Permit | None = None,
        queued_s: float = 0.0,
    ) -> BatchResult:
        """Serve one batch's sandbox until its container is gone: a new one, or ``slot`` given the task.

        Raises:
            HandOverFailed: ``slot`` did not take its task (nothing of it ran).
        """
        host = self.host
        task_dir = slot.task_dir if slot is not None else self.workspace
        wake = threading.Event()
        rows = self.rows.batch(number)
        session = TaskSession(
            self.task_id,
            self.config,
            broker,
            max_result_bytes=self.policy.max_result_bytes,
            on_event=lambda event: self.events.report(event, number),
            on_finish=wake.set,
            data_dir=view.path,
            rows=rows,
        )
        assembly: Assembly | None = None
        collector = OutputCollector(
            host.backend,
            self.task_id,
            on_line=lambda stream, line: self.events.log_line(stream, line, number),
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
                self.warm_starts += 1
        finally:
            relay.attach(None)
            if assembly is not None:
                assembly.close()
            elif slot is not None:
                slot.server.stop()
            rows.seal()
            collector.stop(OUTPUT_DRAIN_S)
        return BatchResult(
            outcome=outcome,
            rows=rows.rows,
            files=session.file_outcomes(),
            missing=view.missing,
            started_at=started_at,
            ended_at=datetime.now(UTC),
        )
