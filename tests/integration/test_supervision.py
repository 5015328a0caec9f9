"""Every way a task can end, on real containers: each ends cleanly with a clear outcome."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

import docker.errors
import pytest

from executor.backends import LABEL_PARENT, LABEL_TASK
from executor.backends.docker import DockerBackend
from executor.mailbox.crypto import TaskKeys
from executor.outcome import Status
from executor.policy import IsolationPolicy
from executor.runner import Executor
from executor.sandbox.init import EXIT_PARENT_GONE, OUTPUT_CAP_BYTES, OUTPUT_TAIL_BYTES
from executor.spec import TaskSpec
from executor.task.supervisor import CANCEL_GRACE_S

from ..conftest import PROTOCOLS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
RUNTIMES = ("runc", "runsc")


@pytest.fixture(params=RUNTIMES)
def runtime(request, docker_client):
    """Each runtime in turn; gVisor must be registered with the engine."""
    if request.param not in docker_client.info().get("Runtimes", {}):
        pytest.fail(f"the {request.param} runtime is not registered with the engine: run `make runsc`")
    return request.param


def _run_in_thread(executor, spec, **kwargs):
    started = threading.Event()
    box: list = []

    def on_progress(event):
        if event.kind == "RUN_START":
            started.set()

    thread = threading.Thread(
        target=lambda: box.append(executor.run(spec, on_progress=on_progress, **kwargs)), daemon=True
    )
    thread.start()
    return thread, started, box


def test_frozen_sandbox_is_detected_and_the_modeller_told(make_executor, modeller, data_dir):
    policy = IsolationPolicy.hardened().replace(heartbeat_interval_s=0.2, heartbeat_timeout_s=1.5)
    keys = TaskKeys.generate()
    modeller.add_task("frozen", keys)
    executor = make_executor(policy=policy, transport=modeller.transport)
    outcome = executor.run(
        TaskSpec(protocol_dir=PROTOCOLS / "freezes", data_dir=data_dir, task_id="frozen", keys=keys)
    )

    assert outcome.status is Status.TIMEOUT
    assert outcome.error is not None
    assert outcome.error.type == "HeartbeatTimeout"
    # The supervisor's own measure of the silence when it gave up: past the
    # limit, so it did not fire early. How soon after the limit it fires is
    # measured by bench/failure_detection.py, not asserted here (no wall-clock
    # assertions in tests).
    assert outcome.error.limit_s == 1.5
    assert outcome.error.measured_s is not None
    assert outcome.error.measured_s > 1.5
    abort = modeller.receive("frozen", timeout=5)
    assert abort is not None
    assert abort.type == "TASK_ABORT"
    body = json.loads(abort.read())
    assert body["reason"] == "LimitsExceeded"
    assert body["exception_type"] == "HeartbeatTimeout"


def test_alive_but_stuck_is_told_apart_from_frozen(make_executor, data_dir):
    policy = IsolationPolicy.hardened().replace(
        heartbeat_interval_s=0.2, heartbeat_timeout_s=30, stall_timeout_s=1.5
    )
    outcome = make_executor(policy=policy).run(
        TaskSpec(protocol_dir=PROTOCOLS / "busy_stuck", data_dir=data_dir)
    )
    assert outcome.status is Status.TIMEOUT
    assert outcome.error is not None
    assert outcome.error.type == "StallTimeout"
    assert "alive but made no progress" in outcome.error.message


def test_wall_clock_limit_gives_timeout(make_executor, data_dir):
    policy = IsolationPolicy.hardened().replace(timeout_s=2)
    outcome = make_executor(policy=policy).run(TaskSpec(protocol_dir=PROTOCOLS / "sleeps", data_dir=data_dir))
    assert outcome.status is Status.TIMEOUT
    assert outcome.error is not None
    assert outcome.error.type == "TimeoutError"
    assert outcome.error.limit_s == 2
    assert outcome.error.measured_s is not None
    assert outcome.error.measured_s >= 2


def test_cancel_stops_the_task_gracefully(make_executor, data_dir):
    cancel = threading.Event()
    thread, started, box = _run_in_thread(
        make_executor(), TaskSpec(protocol_dir=PROTOCOLS / "sleeps", data_dir=data_dir), cancel=cancel
    )
    assert started.wait(60)
    cancel.set()
    thread.join(60)
    assert not thread.is_alive(), "the task did not end within 60 s of its test's wait"
    outcome = box[0]
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert "stopped" in outcome.error.message
    assert "grace period" in outcome.error.message
    assert "killed" not in outcome.error.message


def test_cancel_kills_a_protocol_that_ignores_it(make_executor, data_dir):
    cancel = threading.Event()
    thread, started, box = _run_in_thread(
        make_executor(), TaskSpec(protocol_dir=PROTOCOLS / "stubborn", data_dir=data_dir), cancel=cancel
    )
    assert started.wait(60)
    cancel.set()
    thread.join(60)
    assert not thread.is_alive(), "the task did not end within 60 s of its test's wait"
    outcome = box[0]
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert "killed after" in outcome.error.message
    assert outcome.error.limit_s == CANCEL_GRACE_S


def test_docker_kill_from_outside_gives_killed(make_executor, data_dir, docker_client):
    executor = make_executor()
    thread, started, box = _run_in_thread(
        executor, TaskSpec(protocol_dir=PROTOCOLS / "sleeps", data_dir=data_dir, task_id="victim")
    )
    assert started.wait(60)
    (container,) = docker_client.containers.list(
        filters={"label": [f"{LABEL_TASK}=victim", f"{LABEL_PARENT}={executor.instance_id}"]}
    )
    container.kill()
    thread.join(60)
    assert not thread.is_alive(), "the task did not end within 60 s of its test's wait"
    outcome = box[0]
    assert outcome.status is Status.KILLED
    assert outcome.error is not None
    assert outcome.error.exit_code == 137
    assert outcome.error.type == "Killed"


def test_memory_hog_is_reported_as_out_of_memory(make_executor, data_dir):
    policy = IsolationPolicy.hardened().replace(memory_mb=128)
    outcome = make_executor(policy=policy).run(
        TaskSpec(protocol_dir=PROTOCOLS / "memory_hog", data_dir=data_dir)
    )
    assert outcome.status is Status.KILLED
    assert outcome.error is not None
    assert outcome.error.type == "OutOfMemory"
    assert outcome.error.memory_limit_mb == 128


def test_fork_bomb_stops_at_the_pids_cap_and_the_parent_carries_on(make_executor, data_dir):
    policy = IsolationPolicy.hardened().replace(pids=64)
    executor = make_executor(policy=policy)
    outcome = executor.run(TaskSpec(protocol_dir=PROTOCOLS / "fork_bomb", data_dir=data_dir))
    assert outcome.status is Status.OK, outcome.error
    assert outcome.result["refused"] == "BlockingIOError"
    assert 0 < outcome.result["children"] < 64
    again = executor.run(
        TaskSpec(protocol_dir=PROTOCOLS / "async_run", data_dir=data_dir, parameters={"n": 2})
    )
    assert again.status is Status.OK, again.error


def test_huge_result_is_an_error_not_a_parent_problem(make_executor, data_dir):
    outcome = make_executor().run(TaskSpec(protocol_dir=PROTOCOLS / "huge_result", data_dir=data_dir))
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert outcome.error.type == "ResultTooLarge"
    assert "the limit is 1048576" in outcome.error.message


def test_timings_cover_every_startup_phase(make_executor, data_dir):
    outcome = make_executor().run(
        TaskSpec(protocol_dir=PROTOCOLS / "async_run", data_dir=data_dir, parameters={"n": 1})
    )
    assert outcome.status is Status.OK
    phases = {"create", "start", "boot", "import", "config", "load", "run", "total"}
    # "queued" too when the task waited for a start permit (other work on the host).
    assert phases <= set(outcome.timings) <= phases | {"queued"}
    assert outcome.timings["total"] >= outcome.timings["create"] + outcome.timings["start"]


ORPHAN_PARENT = r"""
import sys
from pathlib import Path
from executor.runner import Executor
from executor.spec import TaskSpec
from executor.policy import IsolationPolicy
policy = IsolationPolicy.hardened().replace(timeout_s=120)
ex = Executor(policy=policy, run_dir=Path(sys.argv[1]), spool_dir=Path(sys.argv[2]))
print(ex.instance_id, flush=True)
def started(event):
    if event.kind == "RUN_START":
        print("running", flush=True)
spec = TaskSpec(protocol_dir=Path(sys.argv[3]), data_dir=Path(sys.argv[4]), task_id="orphan")
ex.run(spec, on_progress=started)
"""


def test_parent_killed_with_sigkill_leaves_containers_the_next_start_reaps(
    docker_client, data_dir, run_dir, tmp_path
):
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_PARENT)
    spool = tmp_path / "spool"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(run_dir), str(spool), str(PROTOCOLS / "sleeps"), str(data_dir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        instance = proc.stdout.readline().strip()
        label = f"{LABEL_PARENT}={instance}"
        assert proc.stdout.readline().strip() == "running", "the orphan's protocol never started"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        proc.stdout.close()
    orphans = {c.id for c in docker_client.containers.list(all=True, filters={"label": label})}
    assert len(orphans) == 1
    assert list(run_dir.iterdir())

    executor = Executor(run_dir=run_dir, spool_dir=spool)
    report = executor.reap()
    # Other dead executors' leftovers on a shared engine may be reaped too:
    # what matters is that this orphan is among them.
    assert orphans <= set(report.containers)
    assert len(report.task_dirs) == 1
    assert not docker_client.containers.list(all=True, filters={"label": label})
    assert list(run_dir.iterdir()) == []
    assert not spool.exists() or list(spool.iterdir()) == []


def test_the_sandbox_exits_by_itself_when_its_parent_dies(docker_client, data_dir, run_dir, tmp_path):
    script = tmp_path / "parent.py"
    script.write_text(ORPHAN_PARENT)
    proc = subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(run_dir),
            str(tmp_path / "spool"),
            str(PROTOCOLS / "sleeps"),
            str(data_dir),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    label = ""
    try:
        label = f"{LABEL_PARENT}={proc.stdout.readline().strip()}"
        assert proc.stdout.readline().strip() == "running", "the orphan's protocol never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        (container,) = docker_client.containers.list(all=True, filters={"label": label})
        result = container.wait(timeout=60)
        assert result["StatusCode"] == 75  # the runtime's "parent gone" exit
        assert b"lost the parent" in container.logs(stdout=False, stderr=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]
        for c in docker_client.containers.list(all=True, filters={"label": label}):
            with contextlib.suppress(docker.errors.APIError):  # another reaper got there first
                c.remove(force=True)


# Before the fix these failed only when the freeze beat the first heartbeat out
# of the sandbox (a race, lost in about half the runs);
# tests/unit/test_runtime_start.py pins the order that closes it.
@pytest.mark.parametrize("start", ["cold", "warm"])
@pytest.mark.parametrize("protocol", ["freezes_on_import", "freezes_at_start"])
def test_a_freeze_on_the_first_line_is_caught_by_the_heartbeat_timeout(
    make_executor, data_dir, runtime, protocol, start
):
    # The wall clock is shorter than the boot grace: a freeze that fell under
    # the grace ends as TimeoutError, not HeartbeatTimeout. Warm: the first
    # beat travels on the slot's start line, the rest on the stream.
    policy = IsolationPolicy.hardened().replace(
        runtime=runtime,
        heartbeat_interval_s=0.5,
        heartbeat_timeout_s=3,
        timeout_s=25,
        warm_pool=int(start == "warm"),
    )
    executor = make_executor(policy=policy)
    if start == "warm":
        assert executor.warm_up(wait=60), executor.pool_stats()
    outcome = executor.run(TaskSpec(protocol_dir=PROTOCOLS / protocol, data_dir=data_dir))
    assert outcome.warm_starts == int(start == "warm")
    assert outcome.status is Status.TIMEOUT, outcome.error
    assert outcome.error is not None
    assert outcome.error.type == "HeartbeatTimeout", outcome.error
    assert outcome.error.limit_s == 3
    assert outcome.error.measured_s is not None
    assert outcome.error.measured_s > 3


OUTLIVING_PARENT = r"""
import sys
from pathlib import Path
from executor.runner import Executor
from executor.spec import TaskSpec
from executor.policy import IsolationPolicy
run_dir, spool, protocol, data, runtime, mode = sys.argv[1:]
policy = IsolationPolicy.hardened().replace(runtime=runtime, timeout_s=120)
ex = Executor(policy=policy, run_dir=Path(run_dir), spool_dir=Path(spool))
print(ex.instance_id, flush=True)
def started(event):
    if event.kind == "RUN_START":
        print("running", flush=True)
spec = TaskSpec(protocol_dir=Path(protocol), data_dir=Path(data), parameters={"mode": mode})
ex.run(spec, on_progress=started)
"""
# How long a sandbox may take to notice its parent died and stop.
OUTLIVE_WAIT_S = 60


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        pytest.fail(f"the parent printed nothing for {timeout:g} s")
    return proc.stdout.readline().strip()


@pytest.mark.parametrize("mode", ["close_stderr", "defiant"])
def test_no_protocol_keeps_its_sandbox_alive_without_its_parent(
    docker_client, data_dir, run_dir, tmp_path, runtime, mode
):
    script = tmp_path / "parent.py"
    script.write_text(OUTLIVING_PARENT)
    args = [str(run_dir), str(tmp_path / "spool"), str(PROTOCOLS / "outlives_parent"), str(data_dir)]
    proc = subprocess.Popen(
        [sys.executable, str(script), *args, runtime, mode], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    label = ""
    try:
        label = f"{LABEL_PARENT}={_read_line(proc, 60)}"
        assert _read_line(proc, 60) == "running", "the protocol never started"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
        (container,) = docker_client.containers.list(all=True, filters={"label": label})
        try:
            result = container.wait(timeout=OUTLIVE_WAIT_S)
        except Exception:  # the engine's read timeout: the sandbox is still up
            pytest.fail(
                f"the {mode} sandbox under {runtime} still ran {OUTLIVE_WAIT_S} s after its parent died"
            )
        assert result["StatusCode"] == EXIT_PARENT_GONE
        assert b"lost the parent" in container.logs(stdout=False, stderr=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()  # type: ignore[union-attr]
        for c in docker_client.containers.list(all=True, filters={"label": label}) if label else []:
            with contextlib.suppress(docker.errors.APIError):
                c.remove(force=True)


class LogKeepingBackend(DockerBackend):
    """The Docker backend, keeping each container's log as it removes the container."""

    def __init__(self) -> None:
        super().__init__()
        self.logs: list[bytes] = []

    def remove(self, container_id: str) -> None:
        with contextlib.suppress(docker.errors.APIError):
            self.logs.append(bytes(self.client.api.logs(container_id, stdout=True, stderr=True)))
        super().remove(container_id)


def test_a_flood_of_output_is_capped_inside_the_sandbox(make_executor, data_dir, runtime):
    backend = LogKeepingBackend()
    policy = IsolationPolicy.hardened().replace(runtime=runtime, timeout_s=90)
    outcome = make_executor(policy=policy, backend=backend).run(
        TaskSpec(
            protocol_dir=PROTOCOLS / "floods_output",
            data_dir=data_dir,
            parameters={"stdout_mb": 200, "stderr_mb": 4, "exit_code": 3},
        )
    )
    # Its last words survive the flood before them: the parent still tells why it died.
    assert outcome.status is Status.ERROR, outcome.error
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.exit_code) == ("ContainerExited", 3)
    assert "last words" in outcome.error.stderr_tail
    (log,) = backend.logs
    assert b"stdout reached its cap" in log
    assert b"stderr reached its cap" in log
    # Both streams, each capped with its end kept, plus the notes.
    assert len(log) <= 2 * (OUTPUT_CAP_BYTES + OUTPUT_TAIL_BYTES) + 4096
