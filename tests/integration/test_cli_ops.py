"""Operator commands on the real engine: doctor and reap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "executor.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=120,
    )


def test_doctor_reports_engine_runtimes_and_images(docker_client):
    proc = _cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ok") and "engine: Docker" in line for line in lines)
    assert any(line.startswith("ok") and "runtime runsc" in line for line in lines)
    assert any(line.startswith("ok") and "image sandbox-executor/sandbox:latest" in line for line in lines)


def test_doctor_says_how_to_fix_a_dead_engine():
    proc = _cli("doctor", env={**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert proc.returncode == 1
    assert "MISSING engine" in proc.stdout
    assert "start dockerd" in proc.stdout


def test_reap_removes_leftovers_of_dead_executors_only(docker_client, run_dir, tmp_path):
    spool = tmp_path / "spool"
    dead = run_dir / "t-dead"
    dead.mkdir()
    (dead / "owner").write_text("thishost-not-a-real-id")
    live = run_dir / "t-live"
    live.mkdir()
    from executor.reaper import new_instance_id

    (live / "owner").write_text(new_instance_id())  # this very process: alive
    env = {**os.environ, "SANDBOX_EXECUTOR_RUN_DIR": str(run_dir), "SANDBOX_EXECUTOR_SPOOL_DIR": str(spool)}
    proc = _cli("reap", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["task_dirs"] == [str(dead)]
    assert not dead.exists()
    assert live.exists()  # its owner (this process) is alive
