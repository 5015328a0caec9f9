"""The CLI as an operator runs it, in a real subprocess: files, bars, Ctrl-C, exit 2, reap."""

from __future__ import annotations

import contextlib
import json
import re
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import docker.errors
import pytest

from executor.backends import LABEL_MANAGED, LABEL_PARENT, LABEL_TASK
from executor.mailbox.transport import SPOOL_OWNER
from executor.policy import DEFAULT_IMAGE
from executor.task.reaper import new_instance_id
from executor.task.supervisor import CANCEL_GRACE_S
from executor.task.taskdir import OWNER_NAME

from ..conftest import PROTOCOLS, REPO, reused_pid_owner, run_cli

pytestmark = pytest.mark.integration

CLI = [sys.executable, "-m", "executor.cli"]
# How long a test waits for the CLI to reach a point it signals at.
WAIT_S = 60.0


def test_files_in_the_json_and_progress_bars_in_human_output(
    two_files, run_dir, docker_client, cli_env, policy_file
):
    args = ("run", "--policy", str(policy_file), str(PROTOCOLS / "promises"), "--data", str(two_files))
    proc = run_cli(*args, "--json", env=cli_env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["files"] == {"processed": 1, "failed": {"bad.csv": "unparsable row 3"}}

    proc = run_cli(*args, env=cli_env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # Not a terminal: rich draws the bars once, as they ended.
    bars = {line.split()[0]: line for line in proc.stderr.splitlines() if line.strip()}
    assert "2/2" in bars["epochs"]
    assert "2/2" in bars["steps"]
    assert "batch 2" in bars["steps"]
    assert "files: 1 processed, 1 failed" in proc.stdout
    assert "bad.csv: unparsable row 3" in proc.stdout
    assert list(run_dir.iterdir()) == []


def _start(protocol: str, task_id: str, env: dict[str, str], policy_file: Path, data: Path, *extra: str):
    argv = [*CLI, "run", "--policy", str(policy_file), str(PROTOCOLS / protocol), "--data", str(data)]
    return subprocess.Popen(
        [*argv, "--task-id", task_id, *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )


def _wait_running(docker_client, task_id: str) -> None:
    """Until the task's container runs (a signal before that could interrupt its create)."""
    end = time.monotonic() + WAIT_S
    while time.monotonic() < end:
        if docker_client.containers.list(filters={"label": f"{LABEL_TASK}={task_id}", "status": "running"}):
            return
        time.sleep(0.1)
    pytest.fail(f"the container of task {task_id} never ran")


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    """The process's output once it ends (killed if it does not)."""
    try:
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return out, err


def _leftovers(docker_client, task_id: str, run_dir: Path) -> list[str]:
    left = []
    for c in docker_client.containers.list(all=True, filters={"label": f"{LABEL_TASK}={task_id}"}):
        left.append(c.name)
        with contextlib.suppress(docker.errors.APIError):
            c.remove(force=True)
    return left + [str(p) for p in run_dir.iterdir()]


def test_ctrl_c_cancels_the_task_and_it_ends_cancelled(
    data_dir, run_dir, docker_client, cli_env, policy_file
):
    task_id = f"ctrl-c-{uuid.uuid4().hex[:8]}"
    proc = _start("sleeps", task_id, cli_env, policy_file, data_dir, "--json")
    try:
        _wait_running(docker_client, task_id)
        proc.send_signal(signal.SIGINT)
        out, err = _finish(proc)
    finally:
        left = _leftovers(docker_client, task_id, run_dir)
    assert proc.returncode == 1, err
    outcome = json.loads(out)
    assert outcome["status"] == "CANCELLED"
    assert outcome["error"]["type"] == "Cancelled"
    assert outcome["error"]["limit_s"] == CANCEL_GRACE_S
    assert left == []


def test_a_second_ctrl_c_stops_waiting_and_leaves_nothing(
    data_dir, run_dir, docker_client, cli_env, policy_file
):
    task_id = f"ctrl-c2-{uuid.uuid4().hex[:8]}"
    # The protocol ignores the cancel, so the CLI would wait out the grace period.
    proc = _start("stubborn", task_id, cli_env, policy_file, data_dir)
    try:
        _wait_running(docker_client, task_id)
        proc.send_signal(signal.SIGINT)
        ready, _, _ = select.select([proc.stderr], [], [], WAIT_S)
        assert ready, "the CLI said nothing after the first Ctrl-C"
        assert "cancelling" in proc.stderr.readline()
        proc.send_signal(signal.SIGINT)
        out, err = _finish(proc)
    finally:
        left = _leftovers(docker_client, task_id, run_dir)
    # Stopped waiting: no outcome (a waited-out cancel prints CANCELLED and exits 1).
    assert proc.returncode == 130, err
    assert "CANCELLED" not in out
    assert err.strip().splitlines() == ["sandbox-executor: interrupted; stopped waiting for the task"]
    assert left == []


def test_no_engine_is_exit_2_with_one_line(data_dir, run_dir, cli_env, policy_file):
    env = {**cli_env, "DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    proc = run_cli(
        "run",
        "--policy",
        str(policy_file),
        str(PROTOCOLS / "echo"),
        "--data",
        str(data_dir),
        "--json",
        env=env,
        timeout=180,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("sandbox-executor: error: ")
    assert "Docker engine is not reachable" in line
    assert list(run_dir.iterdir()) == []


def test_a_missing_image_is_exit_2_with_one_line(data_dir, run_dir, docker_client, cli_env, tmp_path):
    policy = tmp_path / "policy.toml"
    policy.write_text('[default]\ntimeout_s = 60\nimage = "sandbox-executor/not-built:latest"\n')
    proc = run_cli(
        "run",
        "--policy",
        str(policy),
        str(PROTOCOLS / "echo"),
        "--data",
        str(data_dir),
        env=cli_env,
        timeout=180,
    )
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("sandbox-executor: error: ")
    assert "sandbox-executor/not-built:latest is not built" in line
    assert "make images" in line
    assert list(run_dir.iterdir()) == []


def test_reap_says_what_it_removed(run_dir, docker_client, cli_env, tmp_path):
    spool = Path(cli_env["SANDBOX_EXECUTOR_SPOOL_DIR"])
    dead = reused_pid_owner()
    (run_dir / "t-dead").mkdir()
    (run_dir / "t-dead" / OWNER_NAME).write_text(dead)
    (spool / "s-dead").mkdir(parents=True)
    (spool / "s-dead" / SPOOL_OWNER).write_text(dead)
    proc = run_cli("reap", env=cli_env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    # Containers of other dead executors on a shared engine may be counted too.
    assert re.fullmatch(r"removed \d+ container\(s\), 1 task directory, 1 spool\(s\)\n", proc.stdout)
    assert list(run_dir.iterdir()) == []
    assert list(spool.iterdir()) == []


# `reap --all` removes every managed container on the engine, which on a shared
# engine would kill other tests' tasks: the CLI runs with the backend's listing
# narrowed to this test's containers, everything else as shipped.
SCOPED_REAP = r"""
import sys
from executor.backends.docker import DockerBackend
from executor import cli
listing = DockerBackend.list_managed
def scoped(self):
    return [(cid, labels) for cid, labels in listing(self) if labels.get("test.scope") == sys.argv[1]]
DockerBackend.list_managed = scoped
sys.exit(cli.main(sys.argv[2:]))
"""


def test_reap_all_removes_even_what_live_executors_own(run_dir, docker_client, cli_env):
    scope = uuid.uuid4().hex
    live = new_instance_id()  # this process: alive
    container = docker_client.containers.create(
        DEFAULT_IMAGE,
        ["true"],
        labels={LABEL_MANAGED: "true", LABEL_PARENT: live, LABEL_TASK: "live-task", "test.scope": scope},
        network_mode="none",
    )
    (run_dir / "t-live").mkdir()
    (run_dir / "t-live" / OWNER_NAME).write_text(live)

    def reap(*flags: str) -> dict:
        proc = subprocess.run(
            [sys.executable, "-c", SCOPED_REAP, scope, "reap", "--json", *flags],
            capture_output=True,
            text=True,
            cwd=REPO,
            env=cli_env,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    try:
        plain = reap()
        assert plain["containers"] == []
        assert plain["task_dirs"] == []
        everything = reap("--all")
        assert everything["containers"] == [container.id]
        assert everything["task_dirs"] == [str(run_dir / "t-live")]
        with pytest.raises(docker.errors.NotFound):
            docker_client.containers.get(container.id)
    finally:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)
