"""The Docker backend: one hardened container per task, through docker-py.

This is the only module that knows Docker's keyword arguments. Engine and HTTP
exceptions are wrapped here, so callers only ever see
:mod:`executor.errors`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.types import DeviceRequest, LogConfig, Ulimit
from docker.types import Mount as DockerMount

from executor.backends import (
    IMAGE_FIX,
    LABEL_MANAGED,
    ContainerSpec,
    EngineInfo,
    ExitInfo,
    RuntimeInfo,
    check_image_labels,
)
from executor.backends.cgroups import CgroupPaths, OomWatch, Scheduling, Usage, paths_of, readable
from executor.backends.dockerlogs import follow_logs
from executor.errors import (
    BackendError,
    ConfigurationError,
    ContainerError,
    EngineUnavailableError,
    ImageNotFoundError,
    PolicyError,
)
from executor.policy import Isolation, IsolationPolicy, seccomp

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

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
# uid of its own (executor.task.uids), so this is a per-task cap.
MSGQUEUE_BYTES = 819_200
# Under gVisor the policy's pids cap is enforced inside gVisor's own kernel, as
# RLIMIT_NPROC, which it counts per sandbox (every process and thread of it):
# a fork past it fails with EAGAIN, as under runc's pids cgroup. The host's
# pids cgroup cannot be the policy's cap there: gVisor's own host threads
# count against it (about 40 at rest, and up to 6 more per sandbox process,
# its ptrace stubs), and reaching it ends the whole sandbox (exit 2) instead
# of failing a fork. It is set above what the policy's cap can reach, and
# bounds the host only.
RUNSC_HOST_PIDS_BASE = 64
RUNSC_HOST_PIDS_PER_TASK = 8
# A container that ends by SIGKILL (or, under gVisor, exit 2: its kernel
# ended) without the engine's OOM flag waits this long at most for the
# kernel's own OOM notice (OomWatch), which the engine can lose in a race.
OOM_NOTICE_WAIT_S = 1.0
_OOM_EXITS = (137, -9, 2)
# Engine connections the client keeps for reuse. Each running task holds three
# long requests (wait, and a log follow per stream); docker-py's default of 10
# would make urllib3 discard and warn with a few tasks at once.
POOL_SIZE = 64


# Docker's runtime for each isolation a policy may ask for (runsc as `make runsc` registers it).
RUNTIME_OF: dict[Isolation, str] = {Isolation.CONTAINER: "runc", Isolation.GVISOR: "runsc"}
_ISOLATION_OF = {name: isolation for isolation, name in RUNTIME_OF.items()}


def engine_info_of(info: dict[str, Any]) -> EngineInfo:
    """The engine's facts from its ``docker info`` answer (``client.info()``)."""
    runtimes = info.get("Runtimes") or {}

    def runtime(name: str) -> RuntimeInfo:
        args = tuple(str(a) for a in (runtimes[name] or {}).get("runtimeArgs") or ())
        isolation = _ISOLATION_OF.get(name)
        # gVisor ignores a container's seccomp profile unless started with --oci-seccomp.
        applies = seccomp.runsc_applies_profiles(args) if isolation is Isolation.GVISOR else True
        return RuntimeInfo(name, isolation, applies)

    return EngineInfo(
        "Docker",
        str(info.get("ServerVersion", "?")),
        str(info.get("CgroupVersion", "?")),
        tuple(runtime(name) for name in sorted(runtimes)),
    )


# The one line a runsc task with a seccomp profile gets when gVisor would ignore the profile.
RUNSC_IGNORES_SECCOMP = (
    "seccomp_profile: the engine's runsc runtime is registered without --oci-seccomp, so gVisor "
    "would ignore the profile; run `sudo make runsc` to re-register it, or use runtime runc"
)


def container_kwargs(spec: ContainerSpec) -> dict[str, Any]:
    """docker-py ``containers.create`` arguments for ``spec``.

    The hardening here is not configurable: a policy can only change the
    resource numbers, the image and the isolation (Docker's runtime for it,
    :data:`RUNTIME_OF`).

    Raises:
        ConfigurationError: The policy names no uid: the executor pins the
            task's leased uid before it gets here, and without one the image's
            own user (perhaps root) would run the sandbox.
    """
    p: IsolationPolicy = spec.policy
    if p.uid is None:
        raise ConfigurationError("the container's policy has no uid: lease one (task.uids) and pin it")
    # Always a profile of our own (executor.policy.seccomp), never the engine's
    # default; docker-py wants the profile's JSON text here, not a path.
    security_opt = ["no-new-privileges:true", f"seccomp={seccomp.profile_json(p.seccomp_profile, p.runtime)}"]
    device_requests = [DeviceRequest(count=p.gpus, capabilities=[["gpu"]])] if p.gpus else []
    # RLIMIT_FSIZE, in bytes: a write past it fails with EFBIG (Python ignores SIGXFSZ).
    fsize = [Ulimit(name="fsize", soft=p.file_size_bytes, hard=p.file_size_bytes)] if p.file_size_mb else []
    nproc = [Ulimit(name="nproc", soft=p.pids, hard=p.pids)] if p.isolation is Isolation.GVISOR else []
    return {
        "image": p.image,
        "command": spec.command,
        "name": spec.name,
        "labels": dict(spec.labels),
        "environment": dict(spec.environment),
        "user": f"{p.uid}:{p.gid}",
        "working_dir": SANDBOX_TMP,
        "runtime": RUNTIME_OF[p.isolation],
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
        "pids_limit": host_pids_cap(p),
        "ulimits": [
            Ulimit(name="nofile", soft=p.nofile, hard=p.nofile),
            Ulimit(name="core", soft=0, hard=0),
            Ulimit(name="msgqueue", soft=MSGQUEUE_BYTES, hard=MSGQUEUE_BYTES),
            *fsize,
            *nproc,
        ],
        "shm_size": "16m",
        "log_config": LogConfig(type="json-file", config={"max-size": STDERR_LOG_MAX, "max-file": "1"}),
        # Mount objects, not "src:dst:mode" strings: a host path may hold ':'
        # (a datasource file's name), and one source may be mounted twice.
        "mounts": [
            DockerMount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only)
            for m in spec.mounts
        ],
        "hostname": "sandbox",
        "stdin_open": False,
        "detach": True,
    }


def host_pids_cap(policy: IsolationPolicy) -> int:
    """The container's pids cgroup cap: the policy's, or under gVisor a host bound above it."""
    if policy.isolation is Isolation.GVISOR:
        return RUNSC_HOST_PIDS_BASE + RUNSC_HOST_PIDS_PER_TASK * policy.pids
    return policy.pids


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
        # Each running container's cgroup directories, found once (an inspect) and read often,
        # and the kernel's OOM notices for it.
        self._cgroups: dict[str, CgroupPaths | None] = {}
        self._oom: dict[str, OomWatch] = {}
        self._cgroups_lock = threading.Lock()

    @property
    def client(self) -> docker.DockerClient:
        """The engine client, connecting on first use."""
        with self._lock:
            if self._client is None:
                client: docker.DockerClient | None = None
                try:
                    _probe_local_engine()
                    client = docker.from_env(timeout=30, max_pool_size=POOL_SIZE)
                    client.ping()
                except (docker.errors.DockerException, requests.exceptions.RequestException) as exc:
                    if client is not None:
                        client.close()  # its connection pool holds the socket it tried
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
        """Refuse an image that is not built, or not for this wire version, with the fix.

        Raises:
            ImageNotFoundError: It is missing, or its child runtime speaks
                another wire version (:func:`~executor.backends.check_image_labels`).
            EngineUnavailableError: The engine cannot be reached.
        """
        try:
            found = self._call("image lookup", lambda: self.client.images.get(image))
        except docker.errors.ImageNotFound:
            raise ImageNotFoundError(f"sandbox image {image} is not built; {IMAGE_FIX}") from None
        check_image_labels(image, dict(found.labels or {}))

    def engine_info(self) -> EngineInfo:
        """What the engine says about itself (:func:`engine_info_of`).

        Raises:
            EngineUnavailableError: The engine cannot be reached.
            BackendError: It answered with an error.
        """
        return engine_info_of(self._call("engine info", lambda: self.client.info()))

    def check_runtime(self, policy: IsolationPolicy) -> None:
        """Refuse a policy the engine's runtime would not enforce.

        A seccomp profile under gVisor needs runsc registered with
        ``--oci-seccomp``; without it gVisor ignores the profile. (The
        default profile is not refused there: gVisor's own kernel keeps
        locks and watches inside the sandbox.) A runtime the engine does not
        know fails at create, naming it.

        Raises:
            PolicyError: The policy has a seccomp profile and runsc would ignore it.
            EngineUnavailableError: The engine cannot be reached.
        """
        if policy.isolation is not Isolation.GVISOR or not policy.seccomp_profile:
            return
        runtime = self.engine_info().runtime_for(Isolation.GVISOR)
        if runtime is not None and not runtime.applies_seccomp:
            raise PolicyError(RUNSC_IGNORES_SECCOMP)

    def runtimes(self) -> list[str]:
        """The runtimes the engine knows, by Docker's names."""
        return [r.name for r in self.engine_info().runtimes]

    def create(self, spec: ContainerSpec) -> str:
        """Create the task's container; nothing runs yet.

        Raises:
            PolicyError: The engine's runtime would not enforce the policy
                (see :meth:`check_runtime`).
            ImageNotFoundError: The policy's image is not built.
            ContainerError: The engine refused the container.
        """
        self.check_runtime(spec.policy)
        kwargs = container_kwargs(spec)
        try:
            container = self._retrying("container create", lambda: self.client.containers.create(**kwargs))
        except docker.errors.ImageNotFound:
            raise ImageNotFoundError(f"sandbox image {spec.policy.image} is not built; {IMAGE_FIX}") from None
        return str(container.id)

    def _api(self) -> Any:
        return self.client.api

    def start(self, container_id: str) -> None:
        """Start the container, and watch its cgroup for the kernel's OOM notice (root, cgroup v1)."""
        self._retrying("container start", lambda: self._api().start(container_id), container_id)
        watch = OomWatch.of(self._paths(container_id))
        if watch is not None:
            with self._cgroups_lock:
                self._oom[container_id] = watch

    def wait(self, container_id: str) -> ExitInfo:
        """Block until the container exits, then report how (the OOM flag: the engine's or the kernel's)."""
        result = self._call("container wait", lambda: self._api().wait(container_id), container_id)
        state = self._call(
            "container inspect", lambda: self._api().inspect_container(container_id), container_id
        )["State"]
        code = int(result.get("StatusCode", -1))
        oom = bool(state.get("OOMKilled"))
        with self._cgroups_lock:
            watch = self._oom.pop(container_id, None)
        if watch is not None:
            try:
                if not oom and code in _OOM_EXITS:
                    oom = watch.oom_killed(OOM_NOTICE_WAIT_S)
            finally:
                watch.close()
        return ExitInfo(exit_code=code, oom_killed=oom)

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

    def follow_output(self, container_id: str) -> Iterator[tuple[str, bytes]]:
        """The container's stdout and stderr as the engine logs them, until it stops.

        Two log follows (one per stream, so each chunk keeps its stream's name)
        read the engine's log of the container, not its live pipes: a slow
        reader here never slows the sandbox, and never keeps the container
        alive or delays ``remove`` (which ends both follows). When a follow
        ends, one more read from its last message's time stamp picks up what
        the engine logged after it let the follow go. Errors end the iterator
        quietly (debug log).
        """
        try:
            api = self._api()
        except BackendError as exc:
            log.debug("container %s: output not followed: %s", container_id[:12], exc)
            return iter(())
        return follow_logs(api, container_id)

    def usage_supported(self) -> bool:
        """Whether this process sees the host's cgroups (it must run on the engine's host)."""
        return readable()

    def usage(self, container_id: str) -> Usage | None:
        """The running container's CPU time, OOM kills and refused forks, from its cgroups.

        The cgroup is found once, through the engine's record of the
        container's first process (under gVisor, the sandbox process, which
        holds the whole sandbox's cgroup), then read straight from the host's
        cgroup files. ``None`` if the container is not running or its cgroups
        cannot be seen from here.
        """
        paths = self._paths(container_id)
        return paths.read() if paths is not None else None

    def scheduling(self, container_id: str) -> Scheduling | None:
        """Its threads' standing with the host's scheduler, from its cgroup's thread list and /proc."""
        paths = self._paths(container_id)
        return paths.scheduling() if paths is not None else None

    def _paths(self, container_id: str) -> CgroupPaths | None:
        """The running container's cgroup directories, found once (an inspect); ``None`` if not found."""
        with self._cgroups_lock:
            if container_id in self._cgroups:
                return self._cgroups[container_id]
        try:
            state = self._call(
                "container inspect", lambda: self._api().inspect_container(container_id), container_id
            )["State"]
            pid = int(state.get("Pid") or 0)
            paths = paths_of(pid) if pid and state.get("Running") else None
        except (BackendError, KeyError, TypeError, ValueError) as exc:
            log.debug("container %s: no cgroups found: %s", container_id[:12], exc)
            return None
        if paths is not None:
            with self._cgroups_lock:
                self._cgroups[container_id] = paths
        return paths

    def remove(self, container_id: str) -> None:
        """Force-remove the container and its anonymous volumes."""
        with self._cgroups_lock:
            self._cgroups.pop(container_id, None)
            watch = self._oom.pop(container_id, None)
        if watch is not None:
            watch.close()
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


def _probe_local_engine() -> None:
    """Connect to a local engine's socket once, and close it, before docker-py does.

    docker-py leaves the socket of a failed Unix connect for the garbage
    collector; probing first keeps the usual failures (no socket, a stale one)
    free of that, and names the path. Other hosts (tcp, ssh) are left to docker-py.

    Raises:
        requests.exceptions.ConnectionError: The socket is missing or refuses.
    """
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        return
    path = host.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(10)
        try:
            probe.connect(path)
        except OSError as exc:
            raise requests.exceptions.ConnectionError(f"{path}: {exc.strerror or exc}") from None


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
