"""The reaper's pid-reuse guard: a live pid with another start time is a dead owner."""

from __future__ import annotations

import os
import socket

from executor.task.reaper import instance_alive, new_instance_id, reap
from executor.task.taskdir import OWNER_NAME


class _NoContainers:
    def list_managed(self) -> list[tuple[str, dict[str, str]]]:
        return []

    def remove(self, container_id: str) -> None:  # pragma: no cover - nothing to remove
        raise AssertionError(container_id)


def _reused_pid_id() -> str:
    """An id naming this live process's pid, but a start time it never had."""
    host, pid, started, nonce = new_instance_id().split(":")
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    return f"{host}:{pid}:{int(started) + 1}:{nonce}"


def test_this_process_is_alive_but_its_pid_with_another_start_time_is_not():
    assert instance_alive(new_instance_id())
    assert not instance_alive(_reused_pid_id())


def test_reap_removes_what_an_owner_whose_pid_was_reused_left(tmp_path):
    run_dir, spool = tmp_path / "run", tmp_path / "spool"
    reused, live = run_dir / "t-reused", run_dir / "t-live"
    for path, owner in ((reused, _reused_pid_id()), (live, new_instance_id())):
        path.mkdir(parents=True)
        (path / OWNER_NAME).write_text(owner)
    report = reap(_NoContainers(), run_dir, spool)  # type: ignore[arg-type]
    assert report.task_dirs == [str(reused)]
    assert not reused.exists()
    assert live.exists()
