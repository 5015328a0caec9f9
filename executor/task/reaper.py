"""Remove what a dead parent left behind: containers, task directories, spools.

Every container carries the label of the executor instance that made it, and
every task directory an ``owner`` file with the same instance id. An instance
id names the host, the process id and the process's start time, so a reused
pid is not mistaken for the original parent. Only leftovers of instances on
this host that are provably dead are removed, unless everything is asked for.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from executor.backends import LABEL_PARENT, ContainerBackend
from executor.errors import host_errors
from executor.mailbox.transport import SPOOL_OWNER
from executor.task.taskdir import OWNER_NAME, remove_tree

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

log = logging.getLogger(__name__)


def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            # Field 22, after the parenthesised command, which may hold spaces.
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


UNLABELLED_GRACE_S = 60.0


def _age_s(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def new_instance_id() -> str:
    """An id for this executor instance: host, pid, process start time, nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_time(os.getpid()) or '0'}:{uuid.uuid4().hex[:8]}"


def instance_alive(instance_id: str) -> bool:
    """Whether ``instance_id`` may still be running; other hosts' ids count as alive."""
    try:
        host, pid, started, _ = instance_id.split(":")
    except ValueError:
        return False  # not an id this code made
    if host != socket.gethostname():
        return True
    current = _start_time(int(pid)) if pid.isdigit() else None
    return current is not None and current == started


@dataclass
class ReapReport:
    """What a reap removed."""

    containers: list[str] = field(default_factory=list)
    task_dirs: list[str] = field(default_factory=list)
    spools: list[str] = field(default_factory=list)
    lost_tasks: list[str] = field(default_factory=list)
    """Ledger rows of dead executors' tasks closed as LOST (not removed)."""

    @property
    def total(self) -> int:
        """How many things were removed."""
        return len(self.containers) + len(self.task_dirs) + len(self.spools)


def reap(
    backend: ContainerBackend, run_dir: Path, spool_dir: Path, *, everything: bool = False
) -> ReapReport:
    """Remove leftovers of dead executor instances (of all instances if ``everything``).

    Args:
        backend: The engine to search for labelled containers.
        run_dir: The base of task directories.
        spool_dir: The base of mailbox spools.
        everything: Remove every managed container and task directory, even of
            live instances. For an operator who knows no executor is running.

    Raises:
        BackendError: The engine could not list or remove containers.
        HostError: The host refused to list the run or spool directory.
    """
    report = ReapReport()
    for container_id, labels in backend.list_managed():
        owner = labels.get(LABEL_PARENT, "")
        if everything or not instance_alive(owner):
            backend.remove(container_id)
            report.containers.append(container_id)
    report.task_dirs = _reap_owned(run_dir, OWNER_NAME, "task directories", remove_tree, everything)
    # Spools name their owner themselves: executors with other run
    # directories may share the spool directory.
    report.spools = _reap_owned(
        spool_dir, SPOOL_OWNER, "mailbox spools", lambda p: shutil.rmtree(p, ignore_errors=True), everything
    )
    if report.total:
        log.info(
            "reaped %d container(s), %d task dir(s), %d spool(s) left by dead executors",
            len(report.containers),
            len(report.task_dirs),
            len(report.spools),
        )
    return report


def _reap_owned(
    base: Path, owner_file: str, what: str, remove: Callable[[Path], None], everything: bool
) -> list[str]:
    """Remove the entries of ``base`` whose ``owner_file`` names a dead executor; their paths.

    An entry without an owner file yet is being made by a live executor this
    instant: it is left to a later reap until it is :data:`UNLABELLED_GRACE_S` old.
    """
    removed = []
    for entry in _entries(base, what):
        try:
            owner = (entry / owner_file).read_text().strip()
        except OSError:
            if not everything and _age_s(entry) < UNLABELLED_GRACE_S:
                continue
            owner = ""
        if everything or not instance_alive(owner):
            remove(entry)
            removed.append(str(entry))
    return removed


def _entries(base: Path, what: str) -> list[Path]:
    """What ``base`` holds; nothing if it is not a directory (yet).

    Raises:
        HostError: The host refused to list it.
    """
    if not base.is_dir():
        return []
    with host_errors(f"list {what} in", base):
        return list(base.iterdir())
