"""One warm slot: a sandbox made, started and booted before its task is known, used for one task.

A slot holds everything a cold task's container holds, made before the task
is known, by the same assembly (:mod:`executor.task.assembly`):

- a task directory of its own (random name, owner file for the reaper) with a
  fresh token, its gRPC and bulk sockets, a lifeline init connected to at
  boot and a start line the runtime connected to once booted;
- a uid leased from the policy's range;
- ``protocol/`` and ``data/``: empty directories, closed to the sandbox,
  mounted where a cold task's bundle and data view go. Given a task, the
  parent hard-links its checked bundle into the first and the batch's files
  into the second (:class:`~executor.data.view.DataView`), opens both, and
  only then sends the task's configuration down the runtime's start line (a
  socket it blocks on at no cost, connected before any protocol code
  exists). A view that would need bind mounts cannot be added to a running
  container, so such a task starts cold.

A slot is taken by one task and destroyed when that task's container ends:
never reused. The hand-over is checked: a slot that cannot take its task at
once (it hung up, or its runtime never reads the configuration) raises
:class:`~executor.task.supervisor.HandOverFailed` and is destroyed; up to the
task's first beat no protocol code has run in it.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from executor.backends import ContainerBackend, Mount
from executor.errors import BackendError, host_errors
from executor.rpc.session import SessionRef
from executor.sandbox.contract import SANDBOX_DATA
from executor.task.assembly import assemble
from executor.task.supervisor import BOOT_GRACE_S, BOOT_LIMIT_S, HandOverFailed
from executor.task.taskdir import TaskDir
from executor.task.usage import busy, moving

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from executor.backends import ContainerSpec, Scheduling
    from executor.policy import IsolationPolicy
    from executor.rpc.server import TaskServer
    from executor.rpc.session import TaskSession
    from executor.task.admission import Permit
    from executor.task.lifeline import Lifeline, StartLine
    from executor.task.uids import UidLease, UidPool

log = logging.getLogger(__name__)

BOOT_TIMEOUT_S = BOOT_GRACE_S
"""A slot whose runtime has not reached its start line this long after it started, and whose
CPU time stood still meanwhile, is destroyed (one still booting on a busy host may take until
:data:`~executor.task.supervisor.BOOT_LIMIT_S`)."""


@dataclass
class Slot:
    """One warm sandbox: its directory, uid, server, lifeline and running container."""

    name: str
    spec: ContainerSpec
    task_dir: TaskDir
    lease: UidLease
    server: TaskServer
    lifeline: Lifeline
    start: StartLine
    backend: ContainerBackend
    container_id: str = ""
    started_at: float = field(default_factory=time.monotonic)
    permit: Permit | None = field(default=None, repr=False)
    _cpu_mark: tuple[float, float, Scheduling | None] | None = field(default=None, repr=False)
    _given: bool = False
    _discarded: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def policy(self) -> IsolationPolicy:
        """The slot's policy, its uid the one it leased."""
        return self.spec.policy

    @property
    def ready(self) -> bool:
        """Booted and waiting for its task."""
        return self.start.waiting

    def dead(self, now: float) -> bool:
        """Whether the sandbox stopped waiting (it died) or did not boot in time.

        A slot still booting past :data:`BOOT_TIMEOUT_S` is given more time
        while its CPU time advances (a busy host), up to
        :data:`~executor.task.supervisor.BOOT_LIMIT_S`.
        """
        if self.start.connected:
            return not self.start.waiting
        age = now - self.started_at
        if age <= BOOT_TIMEOUT_S:
            return False
        if age > BOOT_LIMIT_S:
            return True
        try:
            usage = self.backend.usage(self.container_id) if self.container_id else None
        except Exception:
            usage = None
        cpu = usage.cpu_s if usage is not None else None
        if cpu is None:
            return True
        try:
            standing = self.backend.scheduling(self.container_id) if self.container_id else None
        except Exception:
            standing = None
        mark, self._cpu_mark = self._cpu_mark, (now, cpu, standing)
        if mark is None:
            return False  # judged at the next look, over the time between
        # Slow, not dead: its CPU time advances, or its threads want the host (starved, or blocked in it).
        return not busy(cpu - mark[1], now - mark[0]) and not moving(mark[2], standing, now - mark[0])

    def death(self) -> str:
        """How a slot that :meth:`dead` judged dead died, for the pool's last error."""
        if self.start.connected:
            return "stopped while it waited"
        return f"did not boot within {BOOT_TIMEOUT_S:g} s"

    def release_permit(self) -> None:
        """Give back the start permit the slot was made under (it booted, or is gone)."""
        permit = self.permit
        if permit is not None:
            permit.release()

    def give(self, session: TaskSession) -> float:
        """Hand the slot its one task: the waiting sandbox gets the configuration now.

        Returns:
            When (``time.monotonic()``) it was given.

        Raises:
            RuntimeError: The slot was already given a task or destroyed.
            HandOverFailed: The runtime is not waiting on its start line (it
                died or never got there) or could not be written to: nothing
                of the task reached it. The caller destroys the slot.
        """
        with self._lock:
            if self._given or self._discarded:
                raise RuntimeError(f"warm slot {self.name} was already used")
            self._given = True
        if not self.start.waiting:
            raise HandOverFailed(f"warm slot {self.name}: its sandbox is not waiting for a task")
        given_at = time.monotonic()
        self.server.ref.bind(session)
        # The configuration goes down the start line (fetched, as far as the
        # supervisor is concerned, now). The task counts as handed over only
        # at its first beat: a runtime that dies before it beats ran no
        # protocol code, and the supervisor raises HandOverFailed.
        if not self.start.go(session.get_config().SerializeToString()):
            raise HandOverFailed(f"warm slot {self.name}: its start line could not take the task")
        self.start.answer_first_beat(
            lambda: session.record_beat(0, 0, False), self.policy.heartbeat_timeout_s
        )
        return given_at

    def discard(self) -> None:
        """Destroy the slot: container, server, lifeline, directory, uid. Safe twice."""
        with self._lock:
            if self._discarded:
                return
            self._discarded = True
        self.release_permit()
        try:
            if self.container_id:
                try:
                    self.backend.remove(self.container_id)
                except BackendError as exc:
                    log.warning(
                        "warm slot %s: could not remove container %s: %s", self.name, self.container_id, exc
                    )
        finally:
            self.server.stop(grace=0)
            self.start.close()
            self.lifeline.close()
            self.task_dir.remove()
            self.lease.release()


def make_slot(
    backend: ContainerBackend,
    policy: IsolationPolicy,
    *,
    run_dir: Path,
    uids: UidPool,
    instance_id: str,
    permit: Permit | None = None,
    on_ready: Callable[[], None] | None = None,
) -> Slot:
    """Make, start and return one slot of ``policy``; nothing is left behind if it fails.

    ``permit`` (the start permit it is made under) is given back once the
    slot's runtime reaches its start line, or when the slot is destroyed;
    ``on_ready`` is called then too (on the start line's thread).

    Raises:
        CapacityError: No uid of the policy's range is free.
        HostError: The host refused the slot's directory or sockets.
        BackendError: The engine could not create or start the container.
    """
    name = f"warm-{uuid.uuid4().hex[:12]}"
    lease = uids.lease(policy)
    policy = policy.replace(uid=lease.uid)
    task_dir: TaskDir | None = None
    slot: Slot | None = None

    def ready() -> None:
        if slot is not None:
            slot.release_permit()
        if on_ready is not None:
            on_ready()

    try:
        with host_errors("make a warm slot's directory in", run_dir):
            task_dir = TaskDir(run_dir, lease.uid, instance_id, sandbox_gid=policy.gid)
            # Mounted now, filled when the slot is given a task; closed until then.
            task_dir.protocol.mkdir(mode=0o700)
            task_dir.data.mkdir(mode=0o700)
        parts = assemble(
            task_dir,
            SessionRef(name=name),
            name=name,
            project_id="",
            instance_id=instance_id,
            policy=policy,
            bundle_path=task_dir.protocol,
            data_mounts=[Mount(task_dir.data, SANDBOX_DATA)],
            max_result_bytes=policy.max_result_bytes,
            on_waiting=ready,
        )
        assert parts.start is not None
        slot = Slot(
            name,
            parts.spec,
            task_dir,
            lease,
            parts.server,
            parts.lifeline,
            parts.start,
            backend,
            permit=permit,
        )
        slot.container_id = backend.create(slot.spec)
        backend.start(slot.container_id)
        slot.started_at = time.monotonic()
        return slot
    except BaseException:
        if slot is not None:
            with contextlib.suppress(Exception):
                slot.discard()
        else:
            if task_dir is not None:
                with contextlib.suppress(Exception):
                    task_dir.remove()
            lease.release()
            if permit is not None:
                permit.release()
        raise
