"""Policy files on the real engine: per-project runtime (gVisor) and granted secrets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from executor.executor import TaskSpec
from executor.outcome import Status
from executor.policy_file import load_policy_file

from ..conftest import PROTOCOLS, TEST_TIMEOUT_S

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def runsc_registered(docker_client):
    if "runsc" not in docker_client.info().get("Runtimes", {}):
        pytest.fail("the runsc runtime is not registered with the engine: run `make runsc`")


def test_project_policy_picks_gvisor_and_grants_only_named_secrets(
    make_executor, data_dir, tmp_path, monkeypatch, runsc_registered
):
    monkeypatch.setenv("SE_TEST_SECRET", "granted-value")
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(
        """
[default]
memory_mb = 512

[projects.gvisor]
runtime = "runsc"
secrets = { API_TOKEN = "env:SE_TEST_SECRET" }
"""
    )
    executor = make_executor(policy=None, policies=load_policy_file(policy_file))
    gvisor = executor.run(
        TaskSpec(protocol_dir=PROTOCOLS / "secrets", data_dir=data_dir, project_id="gvisor")
    )
    plain = executor.run(TaskSpec(protocol_dir=PROTOCOLS / "secrets", data_dir=data_dir, project_id="other"))

    assert gvisor.status is Status.OK, gvisor.error
    assert gvisor.runtime == "runsc"
    assert gvisor.result["secrets"] == {"API_TOKEN": "granted-value"}
    assert gvisor.result["env_has_secret"] is False  # delivered over gRPC, never in the environment
    assert plain.status is Status.OK, plain.error
    assert plain.runtime == "runc"
    assert plain.result["secrets"] == {}
    assert gvisor.result["kernel"] != plain.result["kernel"]  # gVisor's own kernel answers


def test_cli_run_with_policy_file_under_runsc(data_dir, run_dir, tmp_path, runsc_registered, cli_env):
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(f'[default]\ntimeout_s = {TEST_TIMEOUT_S:g}\n[projects.g]\nruntime = "runsc"\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "executor.cli",
            "run",
            str(PROTOCOLS / "async_run"),
            "--data",
            str(data_dir),
            "--project",
            "g",
            "--policy",
            str(policy_file),
            "--param",
            "n=4",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=cli_env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert (out["status"], out["runtime"], out["result"]) == ("OK", "runsc", {"async": True, "n": 8})
    assert list(run_dir.iterdir()) == []
