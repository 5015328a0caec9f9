"""Many tasks, continuously and at once, on a host that cannot boot them all within the grace.

An orchestrator sends tasks from several callers onto a busy machine. Nothing
may be lost (every task ends with an outcome, and a warm slot that dies while
it is handed a task sends that task elsewhere) and nothing may be judged hung
because the host was slow. These are bounded versions of the runs in
``bench/sustained_load.py`` (``make bench``): 200 tasks through a pool, 128 at once.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import pytest

from executor.outcome import Status
from executor.policy import IsolationPolicy
from executor.spec import TaskSpec
from executor.task import supervisor as supervisor_module
from executor.task.warmpool import Slot

from ..conftest import PROTOCOLS

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.integration

HANGS = {"HeartbeatTimeout", "BootTimeout", "StallTimeout"}


def _spec(data_dir: Path, n: int, sleep: float = 0.0) -> TaskSpec:
    return TaskSpec(
        protocol_dir=PROTOCOLS / "returns", data_dir=data_dir, parameters={"n": n, "sleep": sleep}
    )


def test_a_hundred_tasks_from_four_callers_on_a_pool_of_two_lose_none_though_slots_die_in_hand_over(
    make_executor: Any, data_dir: Path, docker_client: Any, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    policy = IsolationPolicy.hardened().replace(warm_pool=2, timeout_s=60, heartbeat_timeout_s=10)
    executor = make_executor(policy=policy)
    assert executor.warm_up(wait=60), executor.pool_stats()
    # At random moments of a hand-over the slot's container is killed: before
    # its task goes down the start line, or a few milliseconds after (its
    # runtime reading the configuration, or beating for the first time).
    rng = random.Random(17)
    rng_lock = threading.Lock()
    kills: list[str] = []
    real_give = Slot.give

    def kill(container_id: str, delay: float) -> None:
        time.sleep(delay)
        try:
            docker_client.api.kill(container_id)
        except Exception:  # already gone: the kill came too late to matter
            return
        kills.append(container_id)

    gives: list[str] = []

    def chaotic_give(self: Slot, session: Any) -> float:
        # The first hand-over is always killed before it, the second never
        # (so both paths are taken however few slots the refill makes on a
        # busy host); the rest at random.
        with rng_lock:
            roll, delay = rng.random(), rng.uniform(0.0, 0.01)
            n = len(gives)
            gives.append(self.container_id)
        if n == 0 or (n > 1 and roll < 0.1):
            kill(self.container_id, 0.0)
        elif n > 1 and roll < 0.2:
            threading.Thread(target=kill, args=(self.container_id, delay), daemon=True).start()
        return real_give(self, session)

    monkeypatch.setattr(Slot, "give", chaotic_give)
    caplog.set_level(logging.WARNING, logger="executor.task.batch")
    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda n: executor.run(_spec(data_dir, n)), range(100)))

    ends = collections.Counter((o.status, o.error.type if o.error else "") for o in outcomes)
    moved = sum("it starts elsewhere" in r.getMessage() for r in caplog.records)
    # Every task accounted for: it ran to OK, or (a kill that came after its
    # first beat, when its protocol was running) it was killed from outside.
    assert len(outcomes) == 100
    assert set(ends) <= {(Status.OK, ""), (Status.KILLED, "Killed")}, ends
    ok = [o for o in outcomes if o.status is Status.OK]
    assert [o.result for o in ok] == [o.result for o in ok if isinstance(o.result, int)]
    assert sorted(o.result for o in ok) == sorted(set(o.result for o in ok))
    assert ends[(Status.KILLED, "Killed")] <= len(kills)
    assert kills, "no task was killed: the chaos never happened"
    assert moved, (len(kills), moved)  # and tasks moved on
    assert sum(o.warm_starts for o in outcomes) > 0


@pytest.mark.parametrize("max_starting", [None, 24], ids=["admitted", "all-at-once"])
def test_a_burst_larger_than_the_host_can_boot_within_the_grace_is_never_judged_hung(
    make_executor: Any, data_dir: Path, monkeypatch: pytest.MonkeyPatch, max_starting: int | None
) -> None:
    # 24 sandboxes on 2 cores cannot all boot within a 1 s grace. Queued, only
    # a few boot at once; all at once, each is slow but its CPU time advances.
    monkeypatch.setattr(supervisor_module, "BOOT_GRACE_S", 1.0)
    policy = IsolationPolicy.hardened().replace(
        heartbeat_interval_s=0.25, heartbeat_timeout_s=1.0, timeout_s=60
    )
    executor = make_executor(policy=policy, max_starting=max_starting)
    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(lambda n: executor.run(_spec(data_dir, n, sleep=1.0)), range(24)))
    ends = collections.Counter((o.status.value, o.error.type if o.error else "") for o in outcomes)
    assert not {kind for _, kind in ends} & HANGS, ends
    assert ends == {("OK", ""): 24}, ends
    assert sorted(o.result for o in outcomes) == list(range(24))
