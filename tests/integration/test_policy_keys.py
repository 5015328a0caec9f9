"""Every policy key, enforced under runc and under gVisor, or refused before anything runs.

A key a runtime cannot enforce must be an error at ``policy check``, never
silently ignored. The keys enforced inside the sandbox each get a task per
runtime here that pushes past the limit and a check of what happened, judged
from outside where the sandbox could lie (the host's cgroup for CPU). Others
are covered per runtime elsewhere, and named here so that a new key is not
forgotten: ``test_every_key_is_covered`` fails on a key no test names.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any

import pytest

from executor.backends.docker import DockerBackend
from executor.errors import BackendError, PolicyError
from executor.outcome import Status
from executor.policy import IsolationPolicy
from executor.spec import TaskSpec

from ..conftest import PROTOCOLS

if TYPE_CHECKING:
    from pathlib import Path

    from executor.backends import ContainerSpec
    from executor.events import ProgressUpdate

pytestmark = pytest.mark.integration

RUNTIMES = ("runc", "runsc")

# Where each key is enforced and tested under both runtimes, besides this module.
ELSEWHERE = {
    "runtime": "tests/integration/test_policy_runtime.py (the engine's record and the kernel inside)",
    "memory_mb": "tests/security/test_sandbox_hardening.py::test_memory_hog_is_killed_at_the_memory_cap",
    "pids": "tests/security/test_sandbox_hardening.py::test_fork_bomb_is_stopped_by_the_pids_cap...",
    "nofile": "tests/security/test_sandbox_hardening.py (probe nofile_capped, both runtimes)",
    "tmpfs_mb": "tests/security/test_sandbox_hardening.py (probe tmpfs_capped, both runtimes)",
    "uid_start": "tests/security/test_sandbox_hardening.py (probe own_uid_shared_group)",
    "uid_count": "tests/unit/test_uids.py; tests/security (probe own_uid_shared_group)",
    "uid": "tests/unit/test_uids.py (a pinned uid)",
    "gid": "tests/security/test_sandbox_hardening.py (probe own_uid_shared_group)",
    "heartbeat_interval_s": "tests/integration/test_supervision.py (freezes, both runtimes)",
    "heartbeat_timeout_s": "tests/integration/test_supervision.py (freezes, both runtimes)",
    "seccomp_profile": "tests/security (custom and default profiles, both runtimes)",
    "secrets": "tests/integration/test_policy_runtime.py",
    "warm_pool": "tests/integration/test_warm_pool.py (both runtimes)",
    "preload": "tests/integration/test_warm_pool.py (both runtimes)",
    "max_task_mb": "tests/integration/test_mailbox.py; parent-side, the runtime plays no part",
    "max_rows": "tests/unit/test_taskrun.py; parent-side, the runtime plays no part",
    "max_rows_mb": "tests/unit/test_taskrun.py; parent-side, the runtime plays no part",
}
HERE = {
    "cpus",
    "cpu_time_s",
    "file_size_mb",
    "timeout_s",
    "stall_timeout_s",
    "image",
    "gpus",
    "max_result_mb",
    "max_message_mb",
}


def test_every_key_is_covered() -> None:
    keys = {f.name for f in dataclasses.fields(IsolationPolicy)}
    assert keys == set(ELSEWHERE) | HERE, "a policy key no test enforces: add it here or to ELSEWHERE"


@pytest.fixture(params=RUNTIMES)
def runtime(request: pytest.FixtureRequest, docker_client: Any) -> str:
    if request.param not in docker_client.info().get("Runtimes", {}):
        pytest.fail(f"the {request.param} runtime is not registered with the engine: run `make runsc`")
    return str(request.param)


def _spec(data_dir: Path, **parameters: Any) -> TaskSpec:
    return TaskSpec(protocol_dir=PROTOCOLS / "limits", data_dir=data_dir, parameters=parameters)


def _policy(runtime: str, **changes: Any) -> IsolationPolicy:
    return IsolationPolicy.hardened().replace(**{"runtime": runtime, "timeout_s": 60, **changes})


class _UsageBackend(DockerBackend):
    """The Docker backend, remembering the container it made last (to read its cgroup from the test)."""

    def __init__(self) -> None:
        super().__init__()
        self.last = ""

    def create(self, spec: ContainerSpec) -> str:
        self.last = super().create(spec)
        return self.last


def test_cpus_caps_the_whole_sandbox_s_cpu_as_the_host_counts_it(
    make_executor: Any, data_dir: Path, runtime: str
) -> None:
    # Two processes spin for 3 s under a quarter of a core: the host's cgroup,
    # read from outside, counts at most about that (unthrottled they would take
    # what two busy processes get here, one or two cores).
    backend = _UsageBackend()
    executor = make_executor(policy=_policy(runtime, cpus=0.25), backend=backend)
    marks: dict[str, tuple[float, float]] = {}

    def mark(update: ProgressUpdate) -> None:
        usage = backend.usage(backend.last)
        assert usage is not None
        assert usage.cpu_s is not None
        marks[update.kind.value] = (time.monotonic(), usage.cpu_s)

    outcome = executor.run(_spec(data_dir, mode="burn", procs=2, seconds=3), on_progress=mark)
    assert outcome.status is Status.OK, outcome.error
    (t0, c0), (t1, c1) = marks["RUN_START"], marks["RUN_END"]
    share = (c1 - c0) / (t1 - t0)
    assert share <= 0.25 * 1.4, f"the sandbox used {share:.2f} of a core under a cap of 0.25"
    assert share > 0.02, "the protocol did not burn at all: the check would prove nothing"


def test_cpu_time_s_ends_a_busy_sandbox_as_cpu_time_exceeded(
    make_executor: Any, data_dir: Path, runtime: str
) -> None:
    executor = make_executor(policy=_policy(runtime, cpu_time_s=1))
    outcome = executor.run(_spec(data_dir, mode="burn", procs=2, seconds=30))
    assert outcome.status is Status.TIMEOUT, outcome.error
    assert outcome.error is not None, outcome
    assert outcome.error.type == "CpuTimeExceeded", outcome.error
    assert outcome.error.limit_s == 1
    assert outcome.error.measured_s is not None
    assert outcome.error.measured_s > 1


def test_file_size_mb_fails_a_write_past_it_and_names_a_task_that_ends_on_it(
    make_executor: Any, data_dir: Path, runtime: str
) -> None:
    executor = make_executor(policy=_policy(runtime, file_size_mb=0.01))
    limit = int(0.01 * 1024 * 1024)
    caught = executor.run(_spec(data_dir, mode="write", bytes=2 * limit))
    assert caught.status is Status.OK, caught.error
    assert caught.result == {"written": limit, "error": "EFBIG"}
    raised = executor.run(_spec(data_dir, mode="write", bytes=2 * limit, **{"raise": True}))
    assert raised.status is Status.ERROR
    assert raised.error is not None, raised
    assert raised.error.type == "FileSizeExceeded", raised.error


def test_timeout_s_is_the_protocol_s_wall_clock_and_the_boot_is_not_counted(
    make_executor: Any, data_dir: Path, runtime: str
) -> None:
    # Under gVisor the boot alone takes a second or more: a 2 s limit once
    # killed a protocol sleeping 1.5 s.
    executor = make_executor(policy=_policy(runtime, timeout_s=2))
    within = executor.run(_spec(data_dir, mode="sleep", seconds=1.5))
    assert within.status is Status.OK, within.error
    past = executor.run(_spec(data_dir, mode="sleep", seconds=30))
    assert past.status is Status.TIMEOUT
    assert past.error is not None
    assert past.error.type == "TimeoutError"
    assert past.error.limit_s == 2


def test_stall_timeout_s_tells_stuck_from_frozen(make_executor: Any, data_dir: Path, runtime: str) -> None:
    executor = make_executor(policy=_policy(runtime, heartbeat_interval_s=0.2, stall_timeout_s=2))
    outcome = executor.run(_spec(data_dir, mode="stuck"))
    assert outcome.status is Status.TIMEOUT
    assert outcome.error is not None, outcome
    assert outcome.error.type == "StallTimeout", outcome.error


def test_image_is_the_one_the_sandbox_runs(make_executor: Any, data_dir: Path, runtime: str) -> None:
    executor = make_executor(policy=_policy(runtime, image="sandbox-executor/numpy:latest"))
    outcome = executor.run(_spec(data_dir, mode="imports", module="numpy"))
    assert outcome.status is Status.OK, outcome.error
    assert isinstance(outcome.result, str)
    assert outcome.result[0].isdigit()
    plain = make_executor(policy=_policy(runtime)).run(_spec(data_dir, mode="imports", module="numpy"))
    assert plain.status is Status.ERROR
    assert plain.error is not None
    assert plain.error.type == "ModuleNotFoundError"


def test_max_result_mb_refuses_a_larger_result(make_executor: Any, data_dir: Path, runtime: str) -> None:
    executor = make_executor(policy=_policy(runtime, max_result_mb=0.01))
    outcome = executor.run(_spec(data_dir, mode="result", bytes=20_000))
    assert outcome.status is Status.ERROR
    assert outcome.error is not None, outcome
    assert outcome.error.type == "ResultTooLarge", outcome.error


def test_max_message_mb_refuses_a_larger_message(make_executor: Any, data_dir: Path, runtime: str) -> None:
    executor = make_executor(policy=_policy(runtime, max_message_mb=1))
    outcome = executor.run(_spec(data_dir, mode="send", bytes=2 * 1024 * 1024))
    assert outcome.status is Status.ERROR
    assert outcome.error is not None, outcome
    assert outcome.error.type == "MailboxError", outcome.error
    assert "limit" in outcome.error.message


def test_gpus_are_refused_under_gvisor_at_policy_check() -> None:
    with pytest.raises(PolicyError, match="runtime runsc cannot pass GPUs through") as info:
        IsolationPolicy.hardened().replace(runtime="runsc", gpus=1)
    assert "\n" not in str(info.value)


@pytest.mark.skipif(os.path.exists("/dev/nvidia0"), reason="this host has a GPU")
def test_gpus_on_a_host_without_one_is_a_one_line_engine_error(
    make_executor: Any, data_dir: Path, run_dir: Path
) -> None:
    executor = make_executor(policy=_policy("runc", gpus=1))
    with pytest.raises(BackendError) as info:
        executor.run(_spec(data_dir, mode="sleep", seconds=0))
    assert "\n" not in str(info.value)
    assert "device driver" in str(info.value) or "gpu" in str(info.value).lower()
    assert list(run_dir.iterdir()) == []
