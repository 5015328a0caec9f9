"""What the engine itself recorded about a task's container, for tests that must not trust echoes.

An outcome's ``runtime`` is the policy's runtime echoed back; a test that
claims "this ran under gVisor" asks the engine instead, while the container
exists. :class:`RecordingBackend` is the real Docker backend plus that record.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from executor.backends.docker import DockerBackend

if TYPE_CHECKING:
    from executor.backends import ContainerSpec

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass
class Recorded:
    """One container as the engine saw it."""

    container_id: str
    runtime: str = ""  # HostConfig.Runtime, as the engine recorded it at create
    pids_cgroup: Path | None = None  # the container's pids cgroup, found once it started
    pids: list[dict[str, int]] = field(default_factory=list)  # samples taken by the test


def pids_cgroup_of(pid: int) -> Path:
    """The pids cgroup directory of host process ``pid`` (cgroup v1 or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return CGROUP_ROOT / "pids" / path.lstrip("/")
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return CGROUP_ROOT / line[3:].lstrip("/")
    raise LookupError(f"process {pid} is in no pids cgroup")


def read_pids(cgroup: Path) -> dict[str, int]:
    """``current``, ``max`` and the ``max`` event count (refused forks) of a pids cgroup."""
    events = dict(line.split() for line in (cgroup / "pids.events").read_text().splitlines())
    return {
        "current": int((cgroup / "pids.current").read_text()),
        "max": int((cgroup / "pids.max").read_text()),
        "refused": int(events.get("max", "0")),
    }


class RecordingBackend(DockerBackend):
    """The Docker backend, recording each container's runtime and pids cgroup as the engine has them."""

    def __init__(self) -> None:
        super().__init__()
        self.containers: list[Recorded] = []
        self._record_lock = threading.Lock()

    def create(self, spec: ContainerSpec) -> str:
        container_id = super().create(spec)
        host_config = self.client.api.inspect_container(container_id)["HostConfig"]
        with self._record_lock:
            self.containers.append(Recorded(container_id, runtime=str(host_config.get("Runtime") or "")))
        return container_id

    def start(self, container_id: str) -> None:
        super().start(container_id)
        pid = int(self.client.api.inspect_container(container_id)["State"]["Pid"])
        try:
            cgroup = pids_cgroup_of(pid) if pid else None
        except (OSError, LookupError):  # it ended already; a test that needs the cgroup says so
            cgroup = None
        with self._record_lock:
            for rec in self.containers:
                if rec.container_id == container_id:
                    rec.pids_cgroup = cgroup

    def last(self) -> Recorded:
        """The container made last."""
        with self._record_lock:
            assert self.containers, "the executor made no container"
            return self.containers[-1]

    def sample_pids(self) -> dict[str, int]:
        """Read the last container's pids cgroup now, and keep the sample."""
        rec = self.last()
        assert rec.pids_cgroup is not None, f"container {rec.container_id[:12]} has no pids cgroup recorded"
        sample = read_pids(rec.pids_cgroup)
        rec.pids.append(sample)
        return sample
