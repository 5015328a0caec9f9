"""Policy files on the real engine: per-project runtime (gVisor) and granted secrets.

Which runtime ran is judged by the engine's record of the container and by
the kernel the sandbox sees, never by the outcome's ``runtime`` (the policy
echoed back).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from executor.outcome import Status
from executor.policy.file import load_policy_file
from executor.spec import TaskSpec

from ..conftest import PROTOCOLS, TEST_TIMEOUT_S
from ..engine import RecordingBackend

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# A runc sandbox shares this kernel; a gVisor one answers with its own.
HOST_KERNEL = Path("/proc/version").read_text().strip()


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
    backend = RecordingBackend()
    executor = make_executor(policy=None, policies=load_policy_file(policy_file), backend=backend)
    gvisor = executor.run(
        TaskSpec(protocol_dir=PROTOCOLS / "secrets", data_dir=data_dir, project_id="gvisor")
    )
    plain = executor.run(TaskSpec(protocol_dir=PROTOCOLS / "secrets", data_dir=data_dir, project_id="other"))

    # What the engine ran each container with, recorded while it existed.
    assert [c.runtime for c in backend.containers] == ["runsc", "runc"]
    assert gvisor.status is Status.OK, gvisor.error
    assert gvisor.runtime == "runsc"
    assert gvisor.result["kernel"] != HOST_KERNEL  # gVisor's own kernel answers
    assert gvisor.result["secrets"] == {"API_TOKEN": "granted-value"}
    assert gvisor.result["env_has_secret"] is False  # delivered over gRPC, never in the environment
    assert plain.status is Status.OK, plain.error
    assert plain.runtime == "runc"
    assert plain.result["kernel"] == HOST_KERNEL  # the host's own kernel
    assert plain.result["secrets"] == {}


def test_cli_run_with_policy_file_under_runsc(data_dir, run_dir, tmp_path, runsc_registered, cli_env):
    """The CLI's policy file picks gVisor: the probe protocol's kernel check says so from inside."""
    policy_file = tmp_path / "policy.toml"
    policy_file.write_text(f'[default]\ntimeout_s = {TEST_TIMEOUT_S:g}\n[projects.g]\nruntime = "runsc"\n')
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "executor.cli",
            "run",
            str(PROTOCOLS / "probe"),
            "--data",
            str(data_dir),
            "--project",
            "g",
            "--policy",
            str(policy_file),
            "--param",
            'only=["not_root"]',
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
    assert (out["status"], out["runtime"]) == ("OK", "runsc"), out
    # Judged inside the sandbox: gVisor's kernel log names it, and its kernel is not the host's.
    assert out["result"]["runtime"] == "runsc", out["result"]["evidence"]
    assert out["result"]["kernel"] != HOST_KERNEL
    assert out["result"]["probes"]["not_root"]["held"] is True, out["result"]["probes"]
    assert list(run_dir.iterdir()) == []
