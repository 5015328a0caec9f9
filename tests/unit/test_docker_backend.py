"""The Docker backend without an engine: hardening arguments, retries, error wrapping."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import docker.errors
import pytest
import requests

from executor.backends import ContainerSpec, Mount
from executor.backends.docker import (
    RETRIES,
    RUNTIME_OF,
    DockerBackend,
    container_kwargs,
    engine_info_of,
    host_pids_cap,
)
from executor.errors import ConfigurationError, ContainerError, EngineUnavailableError, ImageNotFoundError
from executor.policy import Isolation, IsolationPolicy
from executor.policy.seccomp import default_profile_json


def _spec(policy: IsolationPolicy | None = None) -> ContainerSpec:
    # The executor pins the task's leased uid before the backend sees the policy.
    return ContainerSpec(
        name="sandbox-t",
        command=["python3", "-m", "executor.sandbox"],
        policy=policy or IsolationPolicy.hardened().replace(uid=10_001),
        mounts=[Mount(Path("/host/ipc"), "/run/sandbox"), Mount(Path("/host/data"), "/data")],
        labels={"io.sandbox-executor.managed": "true"},
    )


def test_hardening_is_always_on():
    kw = container_kwargs(_spec())
    assert kw["network_mode"] == "none"
    assert kw["cap_drop"] == ["ALL"]
    assert kw["security_opt"] == ["no-new-privileges:true", f"seccomp={default_profile_json('runc')}"]
    assert kw["privileged"] is False
    assert kw["read_only"] is True
    assert kw["init"] is False  # pid 1 is the runtime's own, untraceable init
    assert kw["user"] == "10001:10001"
    mounts = {m["Target"]: m for m in kw["mounts"]}
    assert mounts["/run/sandbox"] == {
        "Target": "/run/sandbox",
        "Source": "/host/ipc",
        "Type": "bind",
        "ReadOnly": True,
    }
    assert "noexec" in kw["tmpfs"]["/tmp"]
    assert "size=64m" in kw["tmpfs"]["/tmp"]
    assert kw["mem_limit"] == kw["memswap_limit"] == "1024m"
    assert kw["pids_limit"] == 128
    assert {u.name: u.hard for u in kw["ulimits"]} == {"nofile": 1024, "core": 0, "msgqueue": 819_200}
    assert "volumes" not in kw
    assert all(m["ReadOnly"] and m["Type"] == "bind" for m in kw["mounts"])
    assert "/var/run/docker.sock" not in {m["Source"] for m in kw["mounts"]}
    assert not kw["environment"]


def test_policy_numbers_reach_the_engine():
    policy = IsolationPolicy.hardened().replace(
        memory_mb=256, cpus=0.5, pids=256, tmpfs_mb=8, runtime="runsc", uid=12_345, gid=20_000
    )
    kw = container_kwargs(_spec(policy))
    assert (kw["mem_limit"], kw["nano_cpus"], kw["runtime"]) == ("256m", 500_000_000, "runsc")
    assert "size=8m" in kw["tmpfs"]["/tmp"]
    assert kw["user"] == "12345:20000"  # the task's own uid, the shared group


def test_a_policy_asks_for_an_isolation_and_docker_maps_it_to_its_runtime():
    # The policy file's words are the user-facing contract; the engine's names are the backend's.
    assert IsolationPolicy(runtime="runc").isolation is Isolation.CONTAINER
    assert IsolationPolicy(runtime="runsc").isolation is Isolation.GVISOR
    assert set(RUNTIME_OF) == set(Isolation)
    for runtime in ("runc", "runsc"):
        policy = IsolationPolicy(runtime=runtime, uid=10_001)
        assert container_kwargs(_spec(policy))["runtime"] == runtime  # Docker's names for them


def test_docker_reports_its_runtimes_with_the_isolation_each_gives():
    info = engine_info_of(
        {
            "ServerVersion": "20.10.24",
            "CgroupVersion": "1",
            "Runtimes": {
                "io.containerd.runc.v2": {"path": "runc"},
                "runc": {"path": "runc"},
                "runsc": {"path": "/usr/bin/runsc", "runtimeArgs": ["--network=none", "--host-uds=open"]},
            },
        }
    )
    assert (info.name, info.version, info.cgroup_version) == ("Docker", "20.10.24", "1")
    assert [(r.name, r.isolation) for r in info.runtimes] == [
        ("io.containerd.runc.v2", None),
        ("runc", Isolation.CONTAINER),
        ("runsc", Isolation.GVISOR),
    ]
    gvisor = info.runtime_for(Isolation.GVISOR)
    assert gvisor is not None
    assert not gvisor.applies_seccomp
    bare = engine_info_of({})
    assert (bare.version, bare.cgroup_version, bare.runtimes) == ("?", "?", ())
    assert bare.runtime_for(Isolation.CONTAINER) is None


def test_the_pids_cap_is_the_cgroup_s_under_runc_and_gvisor_s_own_under_runsc():
    # Under gVisor the host's pids cgroup counts gVisor's own threads, and
    # reaching it ends the sandbox: the policy's cap goes to gVisor's kernel
    # (RLIMIT_NPROC, a fork past it fails with EAGAIN), the cgroup bounds the host.
    runc = container_kwargs(_spec(IsolationPolicy.hardened().replace(pids=64, uid=12_345)))
    assert runc["pids_limit"] == 64
    assert "nproc" not in {u.name for u in runc["ulimits"]}
    runsc = container_kwargs(_spec(IsolationPolicy.hardened().replace(pids=64, uid=12_345, runtime="runsc")))
    assert {u.name: (u.soft, u.hard) for u in runsc["ulimits"]}["nproc"] == (64, 64)
    assert runsc["pids_limit"] == host_pids_cap(IsolationPolicy.hardened().replace(pids=64, runtime="runsc"))
    assert runsc["pids_limit"] >= 64 + 6 * 64  # gVisor's threads at rest, and a stub per process


def test_file_size_reaches_the_engine_as_rlimit_fsize_in_bytes():
    kw = container_kwargs(_spec(IsolationPolicy.hardened().replace(file_size_mb=2, uid=12_345)))
    assert {u.name: (u.soft, u.hard) for u in kw["ulimits"]}["fsize"] == (2 * 1024 * 1024, 2 * 1024 * 1024)
    plain = container_kwargs(_spec(IsolationPolicy.hardened().replace(uid=12_345)))
    assert "fsize" not in {u.name for u in plain["ulimits"]}


def test_a_policy_without_a_leased_uid_is_refused():
    """Without a uid the image's own user (perhaps root) would run the sandbox."""
    with pytest.raises(ConfigurationError, match="no uid"):
        container_kwargs(_spec(IsolationPolicy.hardened()))


class _Response:
    def __init__(self, status: int) -> None:
        self.status_code = status
        self.reason = "x"


def _api_error(status: int, explanation: str = "boom") -> docker.errors.APIError:
    return docker.errors.APIError("engine said no", response=_Response(status), explanation=explanation)


class _FakeContainers:
    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls = 0

    def create(self, **kwargs: Any) -> Any:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return type("C", (), {"id": "cid-1"})()


class _FakeClient:
    def __init__(self, failures: list[BaseException]) -> None:
        self.containers = _FakeContainers(failures)


def _backend(failures: list[BaseException]) -> tuple[DockerBackend, _FakeContainers]:
    client = _FakeClient(failures)
    return DockerBackend(client, retry_base_s=0.001), client.containers  # type: ignore[arg-type]


def test_transient_server_errors_are_retried():
    backend, containers = _backend([_api_error(500), _api_error(503)])
    assert backend.create(_spec()) == "cid-1"
    assert containers.calls == 3


def test_retries_give_up_with_a_clear_error():
    backend, containers = _backend([_api_error(500, "daemon busy")] * (RETRIES + 1))
    with pytest.raises(ContainerError, match="container create failed: daemon busy"):
        backend.create(_spec())
    assert containers.calls == RETRIES + 1


@pytest.mark.parametrize(
    ("failure", "error"),
    [
        (docker.errors.ImageNotFound("no such image", response=_Response(404)), ImageNotFoundError),
        (_api_error(400, "invalid mount"), ContainerError),
        (_api_error(409, "name in use"), ContainerError),
        (requests.exceptions.ConnectionError("refused"), EngineUnavailableError),
    ],
)
def test_permanent_errors_fail_at_once(failure, error):
    backend, containers = _backend([failure])
    with pytest.raises(error):
        backend.create(_spec())
    assert containers.calls == 1


def test_unreachable_engine_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    with pytest.raises(EngineUnavailableError, match="not reachable") as info:
        DockerBackend().check_image("sandbox-executor/sandbox:latest")
    assert "\n" not in str(info.value)
