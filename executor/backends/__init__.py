"""Container backends: the seam between the executor and a container engine.

:class:`ContainerBackend` is what the executor needs; the Docker backend is
the real one. A fake may serve unit tests of supervision logic, never tests
that claim isolation. Backends are opened by name
(:func:`~executor.backends.registry.open_backend`): an engine is one module
here and one registration line in :mod:`executor.backends.registry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from executor.backends.cgroups import Scheduling, Usage
from executor.backends.registry import DEFAULT_BACKEND, backend_names, open_backend, register_backend
from executor.errors import ImageNotFoundError
from executor.sandbox.contract import WIRE_VERSION

if TYPE_CHECKING:
    from collections.abc import Iterator, Mapping
    from pathlib import Path

    from executor.policy import Isolation, IsolationPolicy

LABEL_PREFIX = "io.sandbox-executor"
LABEL_MANAGED = f"{LABEL_PREFIX}.managed"
LABEL_TASK = f"{LABEL_PREFIX}.task-id"
LABEL_PROJECT = f"{LABEL_PREFIX}.project"
LABEL_PARENT = f"{LABEL_PREFIX}.parent"
LABEL_WARM = f"{LABEL_PREFIX}.warm-slot"
# On an image: the wire version (executor.sandbox.contract.WIRE_VERSION) of the
# child runtime it carries, set by `make images` (docker build --label).
LABEL_WIRE = f"{LABEL_PREFIX}.wire-version"
# What an image was not built by this checkout's `make images` is told to do.
IMAGE_FIX = "run `make images` in the sandbox-executor checkout"

__all__ = [
    "DEFAULT_BACKEND",
    "IMAGE_FIX",
    "LABEL_MANAGED",
    "LABEL_PARENT",
    "LABEL_PREFIX",
    "LABEL_PROJECT",
    "LABEL_TASK",
    "LABEL_WARM",
    "LABEL_WIRE",
    "ContainerBackend",
    "ContainerSpec",
    "EngineInfo",
    "ExitInfo",
    "Mount",
    "RuntimeInfo",
    "Scheduling",
    "Usage",
    "backend_names",
    "check_image_labels",
    "open_backend",
    "register_backend",
]


@dataclass(frozen=True)
class Mount:
    """A host directory or file bind-mounted into the sandbox (read-only unless said otherwise)."""

    source: Path
    target: str
    read_only: bool = True


@dataclass(frozen=True)
class ContainerSpec:
    """Everything a backend needs to create one task's container.

    Attributes:
        name: A unique container name.
        command: The child runtime's argv.
        policy: The isolation policy to enforce.
        mounts: The only host paths the sandbox sees.
        labels: Engine labels (never secrets).
        environment: Non-secret environment variables.
    """

    name: str
    command: list[str]
    policy: IsolationPolicy
    mounts: list[Mount]
    labels: dict[str, str] = field(default_factory=dict)
    environment: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ExitInfo:
    """How a container ended."""

    exit_code: int
    oom_killed: bool = False


@dataclass(frozen=True)
class RuntimeInfo:
    """One runtime an engine has.

    Attributes:
        name: The engine's own name for it (Docker's ``runc``, ``runsc``).
        isolation: The isolation it gives a policy, or ``None`` if no policy maps to it.
        applies_seccomp: Whether a policy's own seccomp profile is applied
            under it (gVisor ignores one unless registered with ``--oci-seccomp``).
    """

    name: str
    isolation: Isolation | None
    applies_seccomp: bool = True


@dataclass(frozen=True)
class EngineInfo:
    """What an engine says about itself: what ``doctor`` reports and errors name.

    Attributes:
        name: The engine, as its operator knows it (``Docker``).
        version: Its version.
        cgroup_version: ``1`` or ``2`` (``?`` if it does not say).
        runtimes: The runtimes it has.
    """

    name: str
    version: str
    cgroup_version: str
    runtimes: tuple[RuntimeInfo, ...] = ()

    def runtime_for(self, isolation: Isolation) -> RuntimeInfo | None:
        """The runtime that gives ``isolation``, or ``None`` if the engine has none."""
        return next((r for r in self.runtimes if r.isolation is isolation), None)


def check_image_labels(image: str, labels: Mapping[str, str]) -> None:
    """Refuse an image whose child runtime speaks another wire version than this parent (or says none).

    Every backend's :meth:`~ContainerBackend.check_image` ends here, so a
    stale image is refused before anything starts, in one line with the fix.

    Raises:
        ImageNotFoundError: ``labels`` carry no :data:`LABEL_WIRE`, or another version.
    """
    found = labels.get(LABEL_WIRE)
    if found is None:
        raise ImageNotFoundError(
            f"sandbox image {image} carries no wire version (label {LABEL_WIRE}), so it was not "
            f"built by this version's `make images`; {IMAGE_FIX}"
        )
    if found != str(WIRE_VERSION):
        shown = found if found.isdigit() and len(found) < 10 else repr(found[:20])
        raise ImageNotFoundError(
            f"sandbox image {image} was built for wire version {shown}, and this executor speaks "
            f"version {WIRE_VERSION}; {IMAGE_FIX}"
        )


class ContainerBackend(Protocol):
    """The operations the executor performs on a container engine."""

    def engine_info(self) -> EngineInfo:
        """What the engine says about itself.

        Raises:
            EngineUnavailableError: The engine cannot be reached.
            BackendError: It answered with an error.
        """
        ...

    def check_image(self, image: str) -> None:
        """Raise ``ImageNotFoundError`` unless ``image`` exists and carries this wire version.

        An implementation looks the image's labels up, then calls
        :func:`check_image_labels`.
        """
        ...

    def check_runtime(self, policy: IsolationPolicy) -> None:
        """Raise ``PolicyError`` if the engine's runtime for ``policy`` would not enforce all of it."""
        ...

    def create(self, spec: ContainerSpec) -> str:
        """Create (not start) a container; return its id."""
        ...

    def start(self, container_id: str) -> None:
        """Start a created container."""
        ...

    def wait(self, container_id: str) -> ExitInfo:
        """Block until the container exits."""
        ...

    def kill(self, container_id: str) -> None:
        """Kill the container now; no error if it already stopped."""
        ...

    def stderr_tail(self, container_id: str, lines: int) -> str:
        """The last ``lines`` lines the container wrote to stderr."""
        ...

    def follow_output(self, container_id: str) -> Iterator[tuple[str, bytes]]:
        """The started container's output as it is written, from its start until it stops.

        Yields ``(stream, chunk)`` pairs, ``stream`` being ``"stdout"`` or
        ``"stderr"``; chunks of one stream come in order, the two streams'
        relative order is not kept. The iterator ends when the container
        stops or is removed, and never raises: an engine error ends it
        (logged at debug). Following never keeps the container alive nor
        delays its removal; closing the iterator stops following.
        """
        ...

    def remove(self, container_id: str) -> None:
        """Force-remove the container; no error if it is already gone."""
        ...

    def usage_supported(self) -> bool:
        """Whether :meth:`usage` can measure containers on this host at all (CPU time especially)."""
        ...

    def usage(self, container_id: str) -> Usage | None:
        """What the running container has used so far (CPU time, OOM kills, refused forks).

        Read from outside the sandbox (the kernel's cgroups), cheap enough to
        call several times a second. ``None`` when the engine or host cannot
        tell (the container is gone, or its cgroups are out of this process's
        sight); a figure the host does not keep is ``None`` inside ``Usage``.
        """
        ...

    def scheduling(self, container_id: str) -> Scheduling | None:
        """Whether the running container's threads want CPU or wait on the host's kernel, now.

        Read from outside the sandbox, and only when a silent sandbox whose
        CPU time stood still is about to be judged frozen: runnable threads
        starved of CPU, or threads in an uninterruptible wait, mean slow.
        ``None`` when the host cannot tell (the verdict then rests on CPU time).
        """
        ...

    def list_managed(self) -> list[tuple[str, dict[str, str]]]:
        """Every container carrying this project's managed label, with its labels."""
        ...
