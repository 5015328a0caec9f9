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
  into the second (:class:`~executor.dataview.DataView`), opens both, and
  only then sends the task's configuration down the runtime's start line (a
  socket it blocks on at no cost, connected before any protocol code
  exists). A view that would need bind mounts cannot be added to a running
  container, so such a task starts cold.

A slot is taken by one task and destroyed when that task's container ends:
never reused. The pool refills in the background; slots that die while idle
or fail to boot within :data:`BOOT_TIMEOUT_S` are destroyed and the pool backs
off (a broken image does not spin). :meth:`WarmPool.close` destroys every
slot, including one being made; a parent that dies instead leaves containers
whose init ends them at once (the lifeline) and which the reaper removes, like
a dead parent's cold tasks.
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

from executor.backends import LABEL_WARM, ContainerBackend, Mount
from executor.errors import BackendError, SandboxExecutorError, host_errors
from executor.launch import SANDBOX_DATA, container_spec
from executor.lifeline import Lifeline, StartLine
from executor.rpc.server import TaskServer
from executor.rpc.session import SessionRef
from executor.supervisor import BOOT_GRACE_S
from executor.taskdir import TaskDir

if TYPE_CHECKING:
    from executor.backends import ContainerSpec
    from executor.policy import IsolationPolicy
    from executor.rpc.session import TaskSession
    from executor.uids import UidLease, UidPool

log = logging.getLogger(__name__)

BOOT_TIMEOUT_S = BOOT_GRACE_S
"""A slot whose sandbox has not asked for its task this long after it started is destroyed."""
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
"""After a slot fails to be made or to boot, the pool waits this long (doubling, capped) to retry."""
CHECK_S = 1.0
"""How often the refill thread looks for idle slots that died."""
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
        """Whether the sandbox stopped waiting (it died) or did not boot in time."""
        if self.start.connected:
            return not self.start.waiting
        return now - self.started_at > BOOT_TIMEOUT_S

    def give(self, session: TaskSession) -> float:
        """Hand the slot its one task: the waiting sandbox gets the configuration now.

        Returns:
            When (``time.monotonic()``) it was given.

        Raises:
            RuntimeError: The slot was already given a task or destroyed.
        """
        with self._lock:
            if self._given or self._discarded:
                raise RuntimeError(f"warm slot {self.name} was already used")
            self._given = True
        given_at = time.monotonic()
        self.server.ref.bind(session)
        # The configuration goes down the start line (fetched, as far as the
        # supervisor is concerned, now). A runtime that died just now never
        # reads it; the supervisor then sees its container end, as for a cold
        # one that dies at boot.
        if self.start.go(session.get_config().SerializeToString()):
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
    backend: ContainerBackend, policy: IsolationPolicy, *, run_dir: Path, uids: UidPool, instance_id: str
) -> Slot:
    """Make, start and return one slot of ``policy``; nothing is left behind if it fails.

    Raises:
        CapacityError: No uid of the policy's range is free.
        HostError: The host refused the slot's directory or sockets.
        BackendError: The engine could not create or start the container.
    """
    name = f"warm-{uuid.uuid4().hex[:12]}"
    lease = uids.lease(policy)
    policy = policy.replace(uid=lease.uid)
    made: list[Any] = []
    try:
        with host_errors("make a warm slot's directory in", run_dir):
            task_dir = TaskDir(run_dir, lease.uid, instance_id, sandbox_gid=policy.gid)
            made.append(task_dir)
            # Mounted now, filled when the slot is given a task; closed until then.
            task_dir.protocol.mkdir(mode=0o700)
            task_dir.data.mkdir(mode=0o700)
        with host_errors("listen on", task_dir.socket_path):
            server = TaskServer(
                SessionRef(name=name),
                task_dir.token,
                task_dir.socket_path,
                max_result_bytes=policy.max_result_bytes,
            )
        made.append(server)
        server.start()
        with host_errors("listen on", task_dir.lifeline_path):
            lifeline = Lifeline(task_dir.lifeline_path)
        made.append(lifeline)
        lifeline.start()
        with host_errors("listen on", task_dir.start_path):
            start = StartLine(task_dir.start_path)
        made.append(start)
        start.start()
        with host_errors("hand to the sandbox user", task_dir.ipc):
            task_dir.grant_to_sandbox()
        base = container_spec(
            task_id=name,
            project_id="",
            instance_id=instance_id,
            policy=policy,
            task_dir=task_dir,
            bundle_path=task_dir.protocol,
            data_mounts=[Mount(task_dir.data, SANDBOX_DATA)],
            warm=True,
        )
        spec = type(base)(
            name=base.name,
            command=base.command,
            policy=base.policy,
            mounts=base.mounts,
            labels={**base.labels, LABEL_WARM: "true"},
            environment=base.environment,
        )
        slot = Slot(name, spec, task_dir, lease, server, lifeline, start, backend)
        made = [slot]
        slot.container_id = backend.create(spec)
        backend.start(slot.container_id)
        slot.started_at = time.monotonic()
        return slot
    except BaseException:
        for thing in reversed(made):
            with contextlib.suppress(Exception):
                if isinstance(thing, Slot):
                    thing.discard()
                elif isinstance(thing, TaskServer):
                    thing.stop(grace=0)
                elif isinstance(thing, Lifeline):
                    thing.close()
                elif isinstance(thing, TaskDir):
                    thing.remove()
        if not any(isinstance(thing, Slot) for thing in made):
            lease.release()
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
    """

    def __init__(
        self,
        backend: ContainerBackend,
        policy: IsolationPolicy,
        *,
        run_dir: Path,
        uids: UidPool,
        instance_id: str,
    ) -> None:
        self.backend = backend
        self.policy = policy
        self.size = policy.warm_pool
        self._run_dir = run_dir
        self._uids = uids
        self._instance_id = instance_id
        self._idle: list[Slot] = []
        self._making = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
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
        """A slot for one task (a booted one first), or ``None``: the task starts cold.

        The slot is the caller's from now on: it must :meth:`Slot.discard` it.
        """
        now = time.monotonic()
        with self._cond:
            if self._closed:
                return None
            live = [s for s in self._idle if not s.dead(now)]
            if not live:
                return None
            ready = [s for s in live if s.ready]
            slot = (ready or live)[0]
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
        """Destroy every slot, including one being made; nothing is left behind. Safe twice."""
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            thread = self._thread
            self._cond.notify_all()
        _discard_all(idle)
        if thread is not None and thread is not threading.current_thread():
            thread.join(CLOSE_JOIN_S)
            if thread.is_alive():
                log.warning(
                    "warm pool (%s): a slot being made did not come back in time", self.policy.runtime
                )

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
                    if len(self._idle) < self.size and now >= start_at:
                        self._making += 1
                        break
                    self._cond.wait(CHECK_S if now >= start_at else min(CHECK_S, start_at - now))
                if self._closed:
                    return
                for s in dead:
                    self._idle.remove(s)
            if dead:
                self._lost(dead)
                continue
            self._make_one()

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

    def _make_one(self) -> None:
        try:
            slot = make_slot(
                self.backend,
                self.policy,
                run_dir=self._run_dir,
                uids=self._uids,
                instance_id=self._instance_id,
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
