"""Probes run as protocol code inside a real sandbox: the hardening must hold."""

from __future__ import annotations

import pytest

from executor.executor import TaskSpec
from executor.outcome import Status

from ..conftest import PROTOCOLS

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def probe_results(docker_client, tmp_path_factory):
    """Run the probe protocol once under the hardened default policy."""
    import shutil
    import tempfile
    from pathlib import Path

    from executor.executor import Executor

    data = tmp_path_factory.mktemp("probe-data")
    (data / "records.csv").write_text("id\n1\n")
    data.chmod(0o755)
    run_dir = Path(tempfile.mkdtemp(prefix="se-", dir="/tmp"))
    executor = Executor(run_dir=run_dir)
    try:
        outcome = executor.run(TaskSpec(protocol_dir=PROTOCOLS / "probe", data_dir=data))
        assert outcome.status is Status.OK, outcome.error
        assert list(run_dir.iterdir()) == []
        assert not docker_client.containers.list(
            all=True, filters={"label": f"io.sandbox-executor.parent={executor.instance_id}"}
        )
        return outcome.result
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


EXPECTED = [
    "only_loopback",
    "no_routes",
    "capabilities_empty",
    "no_new_privs",
    "seccomp_filter",
    "not_root",
    "root_read_only",
    "etc_read_only",
    "usr_read_only",
    "data_read_only",
    "data_readable",
    "protocol_read_only",
    "tmp_not_executable",
    "tmp_writable",
    "no_docker_socket",
    "ipc_dir_read_only",
    "nofile_capped",
    "core_dumps_off",
    "memory_capped",
    "own_pid_namespace",
    "no_block_devices",
]


def test_every_probe_ran(probe_results):
    assert sorted(probe_results) == sorted(EXPECTED)


@pytest.mark.parametrize("probe", EXPECTED)
def test_probe_held(probe_results, probe):
    result = probe_results[probe]
    assert result["held"], f"{probe}: {result['detail']}"
