"""A container's threads as the host's scheduler sees them: read from its cgroup's thread list and /proc."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from executor.backends.cgroups import CgroupPaths, paths_of

if TYPE_CHECKING:
    from pathlib import Path


def _thread(proc: Path, tid: int, state: str, waited_ns: int) -> None:
    (proc / str(tid)).mkdir(parents=True)
    # The command name may hold spaces and parentheses: the state is the field after the last ')'.
    (proc / str(tid) / "stat").write_text(f"{tid} (py thon) x) {state} 1 1 1 0 -1\n")
    (proc / str(tid) / "schedstat").write_text(f"123456 {waited_ns} 7\n")


def test_threads_running_runnable_or_in_kernel_wait_are_active_and_waits_are_summed(tmp_path: Path) -> None:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    cgroup.mkdir()
    for tid, state, waited in [
        (11, "S", 1_000_000),
        (12, "R", 2_000_000),
        (13, "D", 0),
        (14, "T", 500_000_000),
    ]:
        _thread(proc, tid, state, waited)
    # 15 ended between the listing and the read: not counted.
    (cgroup / "tasks").write_text("11\n12\n13\n14\n15\n")
    got = CgroupPaths(cpu=cgroup).scheduling(proc=proc)
    assert got is not None
    assert (got.threads, got.active) == (4, 2)
    assert got.waited_s == 0.503


def test_a_cgroup_v2_lists_its_threads_in_cgroup_threads(tmp_path: Path) -> None:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    cgroup.mkdir()
    _thread(proc, 21, "S", 0)
    (cgroup / "cgroup.threads").write_text("21\n")
    got = CgroupPaths(cpu=cgroup, cpu_v2=True).scheduling(proc=proc)
    assert got is not None
    assert (got.threads, got.active, got.waited_s) == (1, 0, 0.0)


def test_a_gone_cgroup_cannot_tell(tmp_path: Path) -> None:
    assert CgroupPaths(cpu=tmp_path / "gone").scheduling(proc=tmp_path) is None
    assert CgroupPaths().scheduling() is None


def test_this_process_is_seen_with_its_threads() -> None:
    paths = paths_of(os.getpid())
    assert paths is not None
    stop = threading.Event()
    sleeper = threading.Thread(target=stop.wait)
    sleeper.start()
    try:
        got = paths.scheduling()
    finally:
        stop.set()
        sleeper.join()
    assert got is not None
    # Everything in this cgroup (at least this process's two threads); the reader itself is running.
    assert got.threads >= 2
    assert got.active >= 1
