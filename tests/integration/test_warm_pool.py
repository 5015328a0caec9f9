"""Warm pools on the real engine: single-use slots, refills, teardown, and a dead parent's pool reaped.

Every task here runs the ``warm_probe`` protocol, which reports whether an
earlier task left a marker in its sandbox's /tmp, which modules were imported
before it ran, and what /data held. The probe suite runs with the pool on too
(tests/security/test_sandbox_hardening.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import docker.errors
import pytest

from executor.backends import LABEL_PARENT, LABEL_WARM, ExitInfo
from executor.outcome import Status
from executor.policy import IsolationPolicy
from executor.runner import Executor
from executor.sandbox.contract import EXIT_PARENT_GONE
from executor.spec import TaskSpec

from ..conftest import PROTOCOLS, REPO
from ..engine import RecordingBackend

if TYPE_CHECKING:
    from pathlib import Path

pytestmark = pytest.mark.integration

RUNTIMES = ("runc", "runsc")
WAIT_FULL_S = 60.0


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest, docker_client: Any) -> str:
    """Each runtime in turn; gVisor must be registered with the engine."""
    if request.param not in docker_client.info().get("Runtimes", {}):
        pytest.fail(f"the {request.param} runtime is not registered with the engine: run `make runsc`")
    return str(request.param)


class WaitRecordingBackend(RecordingBackend):
    """Also records which containers a task was supervised in (one ``wait`` per task's container)."""

    def __init__(self) -> None:
        super().__init__()
        self.waited: list[str] = []

    def wait(self, container_id: str) -> ExitInfo:
        with self._record_lock:
            self.waited.append(container_id)
        return super().wait(container_id)


def _warm(runtime: str = "runc", size: int = 2, **changes: Any) -> IsolationPolicy:
    return IsolationPolicy.hardened().replace(runtime=runtime, warm_pool=size, timeout_s=60, **changes)


def _spec(data_dir: Path, task_id: str | None = None, **parameters: Any) -> TaskSpec:
    return TaskSpec(
        protocol_dir=PROTOCOLS / "warm_probe", data_dir=data_dir, parameters=parameters, task_id=task_id
    )


def _managed(docker_client: Any, executor: Executor) -> list[Any]:
    return list(
        docker_client.containers.list(all=True, filters={"label": f"{LABEL_PARENT}={executor.instance_id}"})
    )


def test_a_warm_task_runs_in_a_fresh_sandbox_with_its_bundle_data_and_preloaded_modules(
    make_executor: Any, data_dir: Path, runtime: str
) -> None:
    executor = make_executor(policy=_warm(runtime, 1, preload=("decimal", "fractions")))
    assert executor.warm_up(wait=WAIT_FULL_S), executor.pool_stats()
    outcome = executor.run(_spec(data_dir, modules=["decimal", "fractions", "difflib"]))
    assert outcome.status is Status.OK, outcome.error
    assert outcome.warm_starts == 1
    assert "assign" in outcome.timings
    assert "create" not in outcome.timings
    result = outcome.result
    assert result["earlier_task"] is False
    # Imported before the task existed; difflib was not asked for.
    assert result["preloaded"] == ["decimal", "fractions"]
    assert result["data"] == {"records.csv": "id,value\n1,10\n2,32\n"}
    assert result["protocol_files"] == ["protocol.py"]
    assert IsolationPolicy.hardened().uid_start <= result["uid"]


def test_a_pool_of_two_runs_six_tasks_submitted_at_once_each_in_a_container_of_its_own(
    make_executor: Any, data_dir: Path, docker_client: Any
) -> None:
    backend = WaitRecordingBackend()
    executor = make_executor(policy=_warm("runc", 2), backend=backend)
    assert executor.warm_up(wait=WAIT_FULL_S), executor.pool_stats()
    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(lambda i: executor.run(_spec(data_dir, f"six-{i}", sleep=0.5)), range(6)))
    for outcome in outcomes:
        assert outcome.status is Status.OK, outcome.error
        assert outcome.result["earlier_task"] is False, "a sandbox was given a second task"
    assert sum(o.warm_starts for o in outcomes) >= 2
    # One container per task, never the same one twice; all of them gone.
    assert len(backend.waited) == 6
    assert len(set(backend.waited)) == 6
    left = {c.id for c in _managed(docker_client, executor)}
    assert not left & set(backend.waited)
    # What remains is the refilled pool, nothing else.
    assert all(c.labels.get(LABEL_WARM) == "true" for c in _managed(docker_client, executor))
    stats = executor.pool_stats()[0]
    assert stats["taken"] == sum(o.warm_starts for o in outcomes)


def test_a_task_whose_data_needs_bind_mounts_starts_cold_and_leaves_the_pool_alone(
    make_executor: Any, data_dir: Path
) -> None:
    executor = make_executor(policy=_warm("runc", 1), view_method="bind")
    assert executor.warm_up(wait=WAIT_FULL_S)
    outcome = executor.run(_spec(data_dir))
    assert outcome.status is Status.OK, outcome.error
    assert outcome.warm_starts == 0
    assert outcome.result["data"] == {"records.csv": "id,value\n1,10\n2,32\n"}
    assert executor.pool_stats()[0]["taken"] == 0


def test_a_batched_task_takes_a_fresh_slot_for_every_batch(
    make_executor: Any, tmp_path: Path, docker_client: Any
) -> None:
    data = tmp_path / "batches"
    data.mkdir()
    for i in range(3):
        (data / f"part-{i}.csv").write_text(f"id\n{i}\n")
        (data / f"part-{i}.csv").chmod(0o644)
    data.chmod(0o755)
    backend = WaitRecordingBackend()
    executor = make_executor(policy=_warm("runc", 2), backend=backend)
    assert executor.warm_up(wait=WAIT_FULL_S)
    spec = TaskSpec(protocol_dir=PROTOCOLS / "warm_probe", data_dir=data, batch_size=1)
    outcome = executor.run(spec)
    assert outcome.status is Status.OK, outcome.error
    assert outcome.batches == {"total": 3, "completed": 3, "size": 1}
    # Each batch saw only its own file, in a sandbox no batch had used.
    assert [sorted(r["data"]) for r in outcome.result] == [["part-0.csv"], ["part-1.csv"], ["part-2.csv"]]
    assert not any(r["earlier_task"] for r in outcome.result)
    assert len(set(backend.waited)) == 3
    assert outcome.warm_starts >= 1


def test_a_slot_that_dies_while_it_waits_is_replaced(
    make_executor: Any, data_dir: Path, docker_client: Any
) -> None:
    executor = make_executor(policy=_warm("runc", 1))
    assert executor.warm_up(wait=WAIT_FULL_S)
    (victim,) = [s["container_id"] for s in executor.pool_stats()[0]["slots"]]
    docker_client.containers.get(victim).kill()
    # The pool notices, destroys it and makes another.
    for _ in range(int(WAIT_FULL_S / 0.2)):
        slots = executor.pool_stats()[0]["slots"]
        if slots and slots[0]["container_id"] != victim and slots[0]["ready"]:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the dead slot was not replaced: {executor.pool_stats()}")
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(victim)
    outcome = executor.run(_spec(data_dir))
    assert outcome.status is Status.OK, outcome.error
    assert outcome.warm_starts == 1


class BlockingStartBackend(RecordingBackend):
    """Holds the pool's next container start until released: a refill caught mid-way."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()
        self.hold = False

    def start(self, container_id: str) -> None:
        if self.hold:
            self.entered.set()
            self.release.wait(30)
        super().start(container_id)


def test_closing_the_executor_mid_refill_leaves_nothing_behind(
    make_executor: Any, data_dir: Path, docker_client: Any, run_dir: Path
) -> None:
    backend = BlockingStartBackend()
    executor = make_executor(policy=_warm("runc", 2), backend=backend)
    assert executor.warm_up(wait=WAIT_FULL_S)
    backend.hold = True
    # A task takes a slot; the pool starts refilling and is held in start().
    outcome = executor.run(_spec(data_dir))
    assert outcome.status is Status.OK, outcome.error
    assert backend.entered.wait(30), "the pool never began to refill"
    closer = threading.Thread(target=executor.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive(), "close() must wait for the slot being made"
    backend.release.set()
    closer.join(60)
    assert not closer.is_alive()
    assert _managed(docker_client, executor) == []
    assert list(run_dir.iterdir()) == []
    assert executor.pool_stats() == []


POOL_PARENT = """
import sys, time
from pathlib import Path
from executor.policy import IsolationPolicy
from executor.runner import Executor
policy = IsolationPolicy.hardened().replace(timeout_s=60, warm_pool=2)
ex = Executor(policy=policy, run_dir=Path(sys.argv[1]), spool_dir=Path(sys.argv[2]))
print(ex.instance_id, flush=True)
print("full" if ex.warm_up(wait=60) else "not full", flush=True)
time.sleep(600)
"""


def test_a_killed_parents_pool_stops_by_itself_and_is_reaped(
    docker_client: Any, run_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "parent.py"
    script.write_text(POOL_PARENT)
    spool = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(spool)], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    label = ""
    try:
        label = f"{LABEL_PARENT}={proc.stdout.readline().strip()}"  # type: ignore[union-attr]
        assert proc.stdout.readline().strip() == "full"  # type: ignore[union-attr]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        slots = docker_client.containers.list(all=True, filters={"label": label})
        assert len(slots) == 2
        for container in slots:
            # init reads the lifeline's end and stops the sandbox.
            assert container.wait(timeout=60)["StatusCode"] == EXIT_PARENT_GONE
        assert len(list(run_dir.iterdir())) == 2
        report = Executor(run_dir=run_dir, spool_dir=spool, warm=False).reap()
        assert {c.id for c in slots} <= set(report.containers)
        assert docker_client.containers.list(all=True, filters={"label": label}) == []
        assert list(run_dir.iterdir()) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]
        for c in docker_client.containers.list(all=True, filters={"label": label}) if label else []:
            with contextlib.suppress(docker.errors.APIError):
                c.remove(force=True)
