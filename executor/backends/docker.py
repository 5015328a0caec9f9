"""The Docker backend: one hardened container per task, through docker-py.

This is the only module that knows Docker's keyword arguments. Engine and HTTP
exceptions are wrapped here, so callers only ever see
:mod:`executor.errors`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig, Ulimit

from executor.backends import LABEL_MANAGED, ContainerSpec, ExitInfo
from executor.errors import (
    BackendError,
    ConfigurationError,
    ContainerError,
    EngineUnavailableError,
    ImageNotFoundError,
)
from executor.policy import IsolationPolicy

_T = TypeVar("_T")
log = logging.getLogger(__name__)

SANDBOX_TMP = "/tmp"
# Transient engine failures on create and start are retried this many times,
# with exponential backoff from RETRY_BASE_S.
RETRIES = 3
RETRY_BASE_S = 0.2
STDERR_LOG_MAX = "1m"
# RLIMIT_MSGQUEUE: the POSIX message-queue bytes one user may hold, pinned at the
# kernel's default whatever the engine's default ulimits say. Each task has a
# uid of its own (executor.uids), so this is a per-task cap.
MSGQUEUE_BYTES = 819_200


@dataclass(frozen=True)
class EngineInfo:
    """The engine facts ``doctor`` reports."""

    version: str
    cgroup_version: str
    runtimes: tuple[str, ...]


def container_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """docker-py ``containers.create`` arguments for ``spec``.

    The hardening here is not configurable: a policy can only change the
    resource numbers, the image and the runtime.

    Raises:
        ConfigurationError: The policy names no uid: the executor pins the
            task's leased uid before it gets here, and without one the image's
            own user (perhaps root) would run the sandbox.
    """
    p: IsolationPolicy = spec.policy
    if p.uid is None:
        raise ConfigurationError("the container's policy has no uid: lease one (executor.uids) and pin it")
    security_opt = ["no-new-privileges:true"]
    if p.seccomp_profile:
        # docker-py wants the profile's JSON text here, not a path.
        security_opt.append(f"seccomp={p.seccomp_profile}")
    device_requests = [DeviceRequest(count=p.gpus, capabilities=[["gpu"]])] if p.gpus else []
    return {
        "image": p.image,
        "command": spec.command,
        "name": spec.name,
        "labels": dict(spec.labels),
        "environment": dict(spec.environment),
        "user": f"{p.uid}:{p.gid}",
        "working_dir": SANDBOX_TMP,
        "runtime": p.runtime,
        "network_mode": "none",
        "cap_drop": ["ALL"],
        "security_opt": security_opt,
        "device_requests": device_requests,
        "privileged": False,
        "read_only": True,
        # pid 1 is the runtime's own init (executor.sandbox.init), not Docker's:
        # tini stays dumpable, so the protocol could ptrace it.
        "init": False,
        "ipc_mode": "private",
        "tmpfs": {SANDBOX_TMP: f"rw,noexec,nosuid,nodev,size={p.tmpfs_mb}m,mode=1777"},
        "mem_limit": f"{p.memory_mb}m",
        "memswap_limit": f"{p.memory_mb}m",
        "nano_cpus": int(p.cpus * 1e9),
        "pids_limit": p.pids,
        "ulimits": [
            Ulimit(name="nofile", soft=p.nofile, hard=p.nofile),
            Ulimit(name="core", soft=0, hard=0),
            Ulimit(name="msgqueue", soft=MSGQUEUE_BYTES, hard=MSGQUEUE_BYTES),
        ],
        "shm_size": "16m",
        "log_config": LogConfig(type="json-file", config={"max-size": STDERR_LOG_MAX, "max-file": "1"}),
        "volumes": {
            str(m.source): {"bind": m.target, "mode": "ro" if m.read_only else "rw"} for m in spec.mounts
        },
        "hostname": "sandbox",
        "stdin_open": False,
        "detach": True,
    }


class DockerBackend:
    """Runs task containers on a Docker engine.

    Args:
        client: A docker-py client; by default one from the environment
            (``DOCKER_HOST`` or the local socket), made on first use.
    """

    def __init__(
        self, client: docker.DockerClient | None = None, *, retry_base_s: float = RETRY_BASE_S
    ) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._retry_base_s = retry_base_s

    @property
    def client(self) -> docker.DockerClient:
        """The engine client, connecting on first use."""
        with self._lock:
            if self._client is None:
                try:
                    client = docker.from_env(timeout=30)
                    client.ping()
                except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                    raise EngineUnavailableError(
                        f"the Docker engine is not reachable ({_short(exc)}); is dockerd running "
                        "and is DOCKER_HOST right?"
                    ) from None
                self._client = client
            return self._client

    def _call(self, what: str, fn: Callable[[], _T], container_id: str | None = None) -> _T:
        try:
            return fn()
        except docker.errors.ImageNotFound:
            raise
        except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
            raise _wrapped(what, exc, container_id) from None

    def _retrying(self, what: str, fn: Callable[[], _T], container_id: str | None = None) -> _T:
        """``_call`` with retries for transient engine errors (HTTP 5xx, read time-outs).

        Permanent errors (a missing image, a bad request, a refused connection)
        fail at once.
        """
        for attempt in range(RETRIES + 1):
            try:
                return fn()
            except docker.errors.ImageNotFound:
                raise
            except (docker.errors.APIError, requests.exceptions.ReadTimeout) as exc:
                transient = isinstance(exc, requests.exceptions.ReadTimeout) or (
                    exc.is_server_error() and exc.status_code not in (404, 409)
                )
                if not transient or attempt == RETRIES:
                    raise _wrapped(what, exc, container_id) from None
                delay = self._retry_base_s * 2**attempt
                log.warning("%s failed (%s); retrying in %.1f s", what, _short(exc), delay)
                time.sleep(delay)
            except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                raise _wrapped(what, exc, container_id) from None
        raise AssertionError("unreachable")

    def check_image(self, image: str) -> None:
        """Raise :class:`ImageNotFoundError` with the fix unless ``image`` exists."""
        try:
            self._call("image lookup", lambda: self.client.images.get(image))
        except docker.errors.ImageNotFound:
            raise ImageNotFoundError(
                f"sandbox image {image} is not built; run `make images` in the sandbox-executor checkout"
            ) from None

    def engine_info(self) -> EngineInfo:
        """What the engine says about itself.

        Raises:
            EngineUnavailableError: The engine cannot be reached.
            BackendError: It answered with an error.
        """
        info = self._call("engine info", lambda: self.client.info())
        return EngineInfo(
            str(info.get("ServerVersion", "?")),
            str(info.get("CgroupVersion", "?")),
            tuple(sorted(info.get("Runtimes", {}))),
        )

    def runtimes(self) -> list[str]:
        """The OCI runtimes the engine knows."""
        return list(self.engine_info().runtimes)

    def create(self, spec: ContainerSpec) -> str:
        """Create the task's container; nothing runs yet."""
        kwargs = container_kwargs(spec)
        try:
            container = self._retrying("container create", lambda: self.client.containers.create(**kwargs))
        except docker.errors.ImageNotFound:
            raise ImageNotFoundError(
                f"sandbox image {spec.policy.image} is not built; run `make images`"
            ) from None
        return str(container.id)

    def _api(self) -> Any:
        return self.client.api

    def start(self, container_id: str) -> None:
        """Start the container."""
        self._retrying("container start", lambda: self._api().start(container_id), container_id)

    def wait(self, container_id: str) -> ExitInfo:
        """Block until the container exits, then report how."""
        result = self._call("container wait", lambda: self._api().wait(container_id), container_id)
        state = self._call(
            "container inspect", lambda: self._api().inspect_container(container_id), container_id
        )["State"]
        return ExitInfo(exit_code=int(result.get("StatusCode", -1)), oom_killed=bool(state.get("OOMKilled")))

    def kill(self, container_id: str) -> None:
        """Kill the container; a container that already stopped is fine."""
        with contextlib.suppress(ContainerError):
            self._call("container kill", lambda: self._api().kill(container_id), container_id)

    def stderr_tail(self, container_id: str, lines: int) -> str:
        """The container's last ``lines`` lines of stderr, decoded leniently."""
        try:
            raw = self._call(
                "container logs",
                lambda: self._api().logs(container_id, stdout=False, stderr=True, tail=lines),
                container_id,
            )
        except ContainerError:
            return ""
        return bytes(raw).decode("utf-8", "replace")[-8192:]

    def remove(self, container_id: str) -> None:
        """Force-remove the container and its anonymous volumes."""
        try:
            self._call(
                "container remove",
                lambda: self._api().remove_container(container_id, force=True, v=True),
                container_id,
            )
        except ContainerError as exc:
            if "No such container" not in str(exc) and "is already in progress" not in str(exc):
                raise

    def list_managed(self) -> list[tuple[str, dict[str, str]]]:
        """Every container (running or not) that an executor made."""
        found = self._call(
            "container list",
            lambda: self._api().containers(all=True, filters={"label": f"{LABEL_MANAGED}=true"}),
        )
        return [(str(c["Id"]), dict(c.get("Labels") or {})) for c in found]


def _wrapped(what: str, exc: BaseException, container_id: str | None) -> BackendError:
    """The package's error for an engine or HTTP exception."""
    if isinstance(exc, docker.errors.APIError):
        return ContainerError(f"{what} failed: {_short(exc)}", container_id=container_id)
    return EngineUnavailableError(
        f"{what} failed: the Docker engine did not answer ({_short(exc)})", container_id=container_id
    )


def _short(exc: BaseException) -> str:
    """One line from an engine exception, without docker-py's HTTP noise."""
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        text = str(exc.explanation)
    else:
        text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300] if text else type(exc).__name__
