"""Every way a task can end, on real containers: each ends cleanly with a clear outcome."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import docker.errors
import pytest

from executor.backends import LABEL_PARENT, LABEL_TASK
from executor.crypto import TaskKeys
from executor.executor import Executor, TaskSpec
from executor.outcome import Status
from executor.policy import IsolationPolicy

from ..conftest import PROTOCOLS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


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
    silence = float(outcome.error.message.split("for ")[1].split(" s")[0])
    assert silence > 1.5
    abort = modeller.receive("frozen", timeout=5)
    assert abort is not None and abort.type == "TASK_ABORT"
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
    assert "wall-clock limit of 2 s" in outcome.error.message


def test_cancel_stops_the_task_gracefully(make_executor, data_dir):
    cancel = threading.Event()
    thread, started, box = _run_in_thread(
        make_executor(), TaskSpec(protocol_dir=PROTOCOLS / "sleeps", data_dir=data_dir), cancel=cancel
    )
    assert started.wait(60)
    cancel.set()
    thread.join(60)
    outcome = box[0]
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert "stopped" in outcome.error.message and "grace period" in outcome.error.message
    assert "killed" not in outcome.error.message


def test_cancel_kills_a_protocol_that_ignores_it(make_executor, data_dir):
    cancel = threading.Event()
    thread, started, box = _run_in_thread(
        make_executor(), TaskSpec(protocol_dir=PROTOCOLS / "stubborn", data_dir=data_dir), cancel=cancel
    )
    assert started.wait(60)
    cancel.set()
    thread.join(60)
    outcome = box[0]
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert "killed after a 5 s grace period" in outcome.error.message


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
    assert "128 MiB" in outcome.error.message


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
    assert set(outcome.timings) == {"create", "start", "boot", "import", "config", "load", "run", "total"}
    assert outcome.timings["total"] >= outcome.timings["create"] + outcome.timings["start"]


ORPHAN_PARENT = r"""
import sys
from pathlib import Path
from executor.executor import Executor, TaskSpec
ex = Executor(run_dir=Path(sys.argv[1]), spool_dir=Path(sys.argv[2]))
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
    assert docker_client.containers.list(all=True, filters={"label": label})
    assert list(run_dir.iterdir())

    executor = Executor(run_dir=run_dir, spool_dir=spool)
    report = executor.reap()
    assert len(report.containers) == 1
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
        for c in docker_client.containers.list(all=True, filters={"label": label}):
            with contextlib.suppress(docker.errors.APIError):  # another reaper got there first
                c.remove(force=True)
