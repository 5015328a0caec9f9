"""Warm pools: sandboxes started, booted and waiting for a task, each used for one task only.

A cold task pays for the engine's create and start and for the sandbox's boot
(an interpreter, grpc, the policy's ``preload`` modules) before its first
protocol line. A policy with ``warm_pool = N`` has the executor keep N
sandboxes of that policy ahead of demand: each a container made exactly as a
cold task's (same image, hardening, caps, uid range, lifeline, labels), whose
runtime has booted (interpreter, grpc, ``preload``) and waits on its start
line for a task.

What a slot holds, and how it is handed its task, is :mod:`executor.task.slot`.
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
while idle or fail to boot within :data:`~executor.task.slot.BOOT_TIMEOUT_S` are destroyed and
the pool backs off (a broken image does not spin). :meth:`WarmPool.close`
destroys every slot, including those being made; a parent that dies instead
leaves containers whose init ends them at once (the lifeline) and which the
reaper removes, like a dead parent's cold tasks.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from executor.errors import SandboxExecutorError
from executor.task.slot import Slot, make_slot

if TYPE_CHECKING:
    from pathlib import Path

    from executor.backends import ContainerBackend
    from executor.policy import IsolationPolicy
    from executor.task.admission import Permit, StartGate
    from executor.task.host import TaskHost
    from executor.task.uids import UidPool

__all__ = ["Slot", "WarmPool", "WarmPools", "make_slot"]

log = logging.getLogger(__name__)
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
            why = slot.death()
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


class WarmPools:
    """An executor's warm pools, one per policy that asks for one: each started at its first use.

    A process that exits without :meth:`close` still tears them down (at exit).

    Args:
        host: The executor's side of every task (engine, run directory, uids, gate).
        enabled: With ``False`` there are none: every task starts cold.
    """

    def __init__(self, host: TaskHost, *, enabled: bool = True) -> None:
        self._host = host
        self._enabled = enabled
        self._pools: dict[IsolationPolicy, WarmPool] = {}
        self._lock = threading.Lock()
        self._closed = False

    def get(self, policy: IsolationPolicy) -> WarmPool | None:
        """The warm pool of ``policy`` (started now if it was not), or ``None`` if it has none."""
        if not self._enabled or not policy.warm_pool:
            return None
        with self._lock:
            if self._closed:
                return None
            pool = self._pools.get(policy)
            if pool is None:
                if not self._pools:
                    atexit.register(self._close_all)
                host = self._host
                pool = WarmPool(
                    host.backend,
                    policy,
                    run_dir=host.run_dir,
                    uids=host.uids,
                    instance_id=host.instance_id,
                    gate=host.gate,
                )
                self._pools[policy] = pool
                pool.start()
        return pool

    def stats(self) -> list[dict[str, Any]]:
        """What each pool holds and has done (see :meth:`WarmPool.stats`)."""
        with self._lock:
            pools = list(self._pools.values())
        return [p.stats() for p in pools]

    def close(self) -> None:
        """Destroy every pool's slots, side by side; no pool starts after. Safe twice."""
        with self._lock:
            self._closed = True
        atexit.unregister(self._close_all)
        self._close_all()

    def _close_all(self) -> None:
        with self._lock:
            pools, self._pools = list(self._pools.values()), {}
        threads = [threading.Thread(target=p.close, name="close-warm-pool") for p in pools]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
