"""Warm pools: sandboxes started, booted and waiting for a task, each used for one task only.

A cold task pays for the engine's create and start and for the sandbox's boot
(an interpreter, grpc, the policy's ``preload`` modules) before its first
protocol line. A policy with ``warm_pool = N`` has the executor keep N
sandboxes of that policy ahead of demand: each a container made exactly as a
cold task's (same image, hardening, caps, uid range, lifeline, labels), whose
runtime has booted (interpreter, grpc, ``preload``) and waits on its start
line for a task.

A slot holds everything a cold task's container holds, made before the task
is known:

- a task directory of its own (random name, owner file for the reaper) with a
  fresh token, its gRPC and bulk sockets, a lifeline init connected to at
  boot and a start line the runtime connected to once booted;
- a uid leased from the policy's range;
- ``protocol/`` and ``data/``: empty directories, closed to the sandbox,
  mounted where a cold task's bundle and data view go. Given a task, the
  parent copies the bundle into the first and hard-links the batch's files
  into the second (:class:`~executor.data.view.DataView`), opens both, and
  only then sends the task's configuration down the runtime's start line (a
  socket it blocks on at no cost, connected before any protocol code
  exists). A view that would need bind mounts cannot be added to a running
  container, so such a task starts cold.

A slot is taken by one task and destroyed when that task's container ends:
never reused. Only a slot whose runtime is booted and waiting on its start
line is handed out, and the hand-over is checked: a slot that cannot take
its task at once (it hung up, or its runtime never reads the configuration)
raises :class:`~executor.task.supervisor.HandOverFailed`, is destroyed, and the
task goes to another slot or starts cold. Up to the task's first beat no
protocol code has run in the slot, so nothing of the task is lost or done
twice. Making slots takes start permits (:mod:`executor.task.admission`) only
when no task waits for one, so a pool never delays a task.

The pool refills in the background, several slots at once; slots that die
while idle or fail to boot within :data:`BOOT_TIMEOUT_S` are destroyed and
the pool backs off (a broken image does not spin). :meth:`WarmPool.close`
destroys every slot, including those being made; a parent that dies instead
leaves containers whose init ends them at once (the lifeline) and which the
reaper removes, like a dead parent's cold tasks.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from executor.backends import ContainerBackend, Mount
from executor.errors import BackendError, SandboxExecutorError, host_errors
from executor.rpc.session import SessionRef
from executor.sandbox.contract import SANDBOX_DATA
from executor.task.assembly import assemble
from executor.task.supervisor import BOOT_GRACE_S, BOOT_LIMIT_S, HandOverFailed
from executor.task.usage import busy

if TYPE_CHECKING:
    from collections.abc import Callable

    from executor.backends import ContainerSpec
    from executor.policy import IsolationPolicy
    from executor.rpc.server import TaskServer
    from executor.rpc.session import TaskSession
    from executor.task.admission import Permit, StartGate
    from executor.task.lifeline import Lifeline, StartLine
    from executor.task.uids import UidLease, UidPool

from executor.task.taskdir import TaskDir

log = logging.getLogger(__name__)

BOOT_TIMEOUT_S = BOOT_GRACE_S
"""A slot whose runtime has not reached its start line this long after it started, and whose
CPU time stood still meanwhile, is destroyed (one still booting on a busy host may take until
:data:`~executor.task.supervisor.BOOT_LIMIT_S`)."""
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
"""After a slot fails to be made or to boot, the pool waits this long (doubling, capped) to retry."""
CHECK_S = 1.0
"""How often the refill thread looks for idle slots that died."""
PERMIT_RETRY_S = 0.1
"""How often the refill thread asks again for a start permit while none is free."""
REFILL_DELAY_S = 0.25
"""After a slot is taken, how long the refill waits: making a slot is engine and GIL work that
would otherwise compete with the task's first milliseconds (its first calls then took 10 ms, not 2)."""
CLOSE_JOIN_S = 60.0
"""How long :meth:`WarmPool.close` waits for a slot being made (an engine call) to come back."""


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
    _cpu_mark: tuple[float, float] | None = field(default=None, repr=False)
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
        mark, self._cpu_mark = self._cpu_mark, (now, cpu)
        if mark is None:
            return False  # judged at the next look, over the time between
        return not busy(cpu - mark[1], now - mark[0])

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


class WarmPool:
    """Keeps ``policy.warm_pool`` slots of one policy ready; a context manager that closes it.

    Args:
        backend: The engine.
        policy: The policy every slot is made under (its ``uid`` unset: each
            slot leases its own).
        run_dir: Where the slots' directories go.
        uids: The host-wide uid leases.
        instance_id: The executor instance, for labels and owner files.
        gate: The host's start permits: a slot is made only under one, and
            only when no task waits for one. ``None``: slots are made freely.
    """

    def __init__(
        self,
        backend: ContainerBackend,
        policy: IsolationPolicy,
        *,
        run_dir: Path,
        uids: UidPool,
        instance_id: str,
        gate: StartGate | None = None,
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.size = policy.warm_pool
        self._run_dir = run_dir
        self._uids = uids
        self._instance_id = instance_id
        self._gate = gate
        self._idle: list[Slot] = []
        self._making = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._makers: set[threading.Thread] = set()
        self._failures = 0
        self._retry_at = 0.0
        self._refill_at = 0.0
        self.made = 0
        self.taken = 0
        self.failed = 0
        self.last_error = ""

    def start(self) -> None:
        """Start filling the pool in the background (once)."""
        with self._cond:
            if self._thread is not None or self._closed or self.size == 0:
                return
            self._thread = threading.Thread(
                target=self._refill, name=f"warm-pool-{self.policy.runtime}", daemon=True
            )
            self._thread.start()

    def take(self) -> Slot | None:
        """A booted slot waiting for its task, or ``None``: the task starts cold (or waits in line).

        Only a slot whose runtime waits on its start line is handed out; one
        still booting stays in the pool. The slot is the caller's from now
        on: it must :meth:`Slot.discard` it.
        """
        now = time.monotonic()
        with self._cond:
            if self._closed:
                return None
            slot = next((s for s in self._idle if s.ready and not s.dead(now)), None)
            if slot is None:
                return None
            self._idle.remove(slot)
            self.taken += 1
            self._refill_at = max(self._refill_at, now + REFILL_DELAY_S)
            self._cond.notify_all()
        return slot

    def wait_full(self, timeout: float) -> bool:
        """Block until every slot is booted and waiting, or ``timeout`` passes; whether it is full."""
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                if self._closed:
                    return False
                if sum(s.ready for s in self._idle) >= self.size:
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.05))

    def stats(self) -> dict[str, Any]:
        """What the pool holds and has done."""
        with self._cond:
            idle = list(self._idle)
            making = self._making
        ready = [s for s in idle if s.ready]
        return {
            "runtime": self.policy.runtime,
            "image": self.policy.image,
            "size": self.size,
            "ready": len(ready),
            "booting": len(idle) - len(ready) + making,
            "made": self.made,
            "taken": self.taken,
            "failed": self.failed,
            "last_error": self.last_error,
            "slots": [{"container_id": s.container_id, "uid": s.policy.uid, "ready": s.ready} for s in idle],
        }

    def close(self) -> None:
        """Destroy every slot, including those being made; nothing is left behind. Safe twice."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            thread = self._thread
            self._cond.notify_all()
        _discard_all(idle)
        end = time.monotonic() + CLOSE_JOIN_S
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, end - time.monotonic()))
        with self._cond:
            makers = list(self._makers)
        for maker in makers:
            if maker is not threading.current_thread():
                maker.join(max(0.0, end - time.monotonic()))
        if (thread is not None and thread.is_alive()) or any(m.is_alive() for m in makers):
            log.warning("warm pool (%s): a slot being made did not come back in time", self.policy.runtime)

    def __enter__(self) -> WarmPool:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the refill thread ---------------------------------------------------------
    def _refill(self) -> None:
        while True:
            dead: list[Slot] = []
            with self._cond:
                while not self._closed:
                    now = time.monotonic()
                    dead = [s for s in self._idle if s.dead(now)]
                    if dead:
                        break
                    if any(s.ready for s in self._idle):
                        self._failures = 0
                    start_at = max(self._retry_at, self._refill_at)
                    missing = self.size - len(self._idle) - self._making
                    if missing > 0 and now >= start_at:
                        break
                    self._cond.wait(CHECK_S if now >= start_at else min(CHECK_S, start_at - now))
                if self._closed:
                    return
                for s in dead:
                    self._idle.remove(s)
            if dead:
                self._lost(dead)
                continue
            permit = self._permit()
            if permit is False:
                continue
            with self._cond:
                if self._closed:
                    if permit is not None:
                        permit.release()
                    return
                self._making += 1
                maker = threading.Thread(
                    target=self._make_one,
                    args=(permit,),
                    name=f"warm-make-{self.policy.runtime}",
                    daemon=True,
                )
                self._makers.add(maker)
            maker.start()

    def _permit(self) -> Permit | bool | None:
        """A start permit for one more slot; ``None`` without a gate; ``False`` if none is free now."""
        if self._gate is None:
            return None
        try:
            permit = self._gate.try_acquire()
        except SandboxExecutorError as exc:
            self._failed(f"could not take a start permit: {exc}")
            return False
        if permit is None:
            with self._cond:
                if not self._closed:
                    self._cond.wait(PERMIT_RETRY_S)
            return False
        return permit

    def _ready(self) -> None:
        """A slot's runtime reached its start line: tasks waiting in line may take it."""
        with self._cond:
            self._cond.notify_all()
        if self._gate is not None:
            self._gate.notify()

    def _lost(self, dead: list[Slot]) -> None:
        for slot in dead:
            why = (
                "stopped while it waited"
                if slot.start.connected
                else f"did not boot within {BOOT_TIMEOUT_S:g} s"
            )
            tail = ""
            with contextlib.suppress(Exception):
                tail = self.backend.stderr_tail(slot.container_id, 5).strip()
            self._failed(f"a warm sandbox {why}" + (f": {tail}" if tail else ""))
        _discard_all(dead)

    def _make_one(self, permit: Permit | None) -> None:
        try:
            try:
                slot = make_slot(
                    self.backend,
                    self.policy,
                    run_dir=self._run_dir,
                    uids=self._uids,
                    instance_id=self._instance_id,
                    permit=permit,
                    on_ready=self._ready,
                )
            except SandboxExecutorError as exc:
                with self._cond:
                    self._making -= 1
                self._failed(f"could not make a warm sandbox: {exc}")
                return
            except BaseException:
                with self._cond:
                    self._making -= 1
                log.exception("warm pool (%s): making a slot failed", self.policy.runtime)
                self._failed("could not make a warm sandbox (see the log)")
                return
            with self._cond:
                self._making -= 1
                closed = self._closed
                if not closed:
                    self._idle.append(slot)
                    self.made += 1
                    self._cond.notify_all()
            if closed:
                slot.discard()
        finally:
            with self._cond:
                self._makers.discard(threading.current_thread())

    def _failed(self, message: str) -> None:
        with self._cond:
            self.failed += 1
            self._failures += 1
            delay = min(RETRY_MAX_S, RETRY_MIN_S * 2 ** (self._failures - 1))
            self._retry_at = time.monotonic() + delay
            self.last_error = message
        log.warning(
            "warm pool (%s): %s; retrying in %g s (tasks start cold meanwhile)",
            self.policy.runtime,
            message,
            delay,
        )


def _discard_all(slots: list[Slot]) -> None:
    """Destroy ``slots`` at once (each removal is an engine round trip)."""
    if not slots:
        return
    threads = [threading.Thread(target=s.discard, name=f"discard-{s.name}") for s in slots[1:]]
    for t in threads:
        t.start()
    slots[0].discard()
    for t in threads:
        t.join()
