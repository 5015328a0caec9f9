"""Operator commands on the real engine: doctor and reap."""

from __future__ import annotations

import json
import os

import pytest

from ..conftest import run_cli

pytestmark = pytest.mark.integration


def test_doctor_reports_engine_runtimes_and_images(docker_client):
    proc = run_cli("doctor")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("ok") and "engine: Docker" in line for line in lines)
    assert any(line.startswith("ok") and "runtime runsc" in line for line in lines)
    assert any(line.startswith("ok") and "image sandbox-executor/sandbox:latest" in line for line in lines)


def test_doctor_says_how_to_fix_a_dead_engine():
    proc = run_cli("doctor", env={**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert proc.returncode == 1
    assert "MISSING engine" in proc.stdout
    assert "start dockerd" in proc.stdout


def test_reap_removes_leftovers_of_dead_executors_only(docker_client, run_dir, cli_env):
    dead = run_dir / "t-dead"
    dead.mkdir()
    (dead / "owner").write_text("thishost-not-a-real-id")
    live = run_dir / "t-live"
    live.mkdir()
    from executor.task.reaper import new_instance_id

    (live / "owner").write_text(new_instance_id())  # this very process: alive
    proc = run_cli("reap", "--json", env=cli_env)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["task_dirs"] == [str(dead)]
    assert not dead.exists()
    assert live.exists()  # its owner (this process) is alive
