"""Sandbox uid leases: one live task per uid, host-wide, given back on every path."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import executor
from executor import paths
from executor.errors import CapacityError, ContainerError, DataSourceError
from executor.outcome import Status
from executor.policy import IsolationPolicy
from executor.runner import Executor, check_data_dir
from executor.spec import TaskSpec
from executor.task.uids import UidPool

if TYPE_CHECKING:
    from executor.backends import ContainerSpec, ExitInfo

RANGE = IsolationPolicy(uid_start=30_000, uid_count=3)
PINNED = IsolationPolicy(uid=31_000)


@pytest.fixture
def pool(tmp_path: Path) -> UidPool:
    return UidPool(tmp_path / "uids")


def test_live_leases_never_share_a_uid_and_a_full_range_is_refused(pool):
    leases = [pool.lease(RANGE) for _ in range(3)]
    try:
        assert sorted(lease.uid for lease in leases) == [30_000, 30_001, 30_002]
        with pytest.raises(CapacityError, match=r"all 3 uids from 30000 to 30002 .* in use") as info:
            pool.lease(RANGE)
        assert "uid_count" in str(info.value)
    finally:
        for lease in leases:
            lease.release()


def test_a_pinned_uid_admits_one_live_task(pool):
    with pool.lease(PINNED) as first:
        assert first.uid == 31_000
        with pytest.raises(CapacityError, match=r"uid 31000 \(pinned by the policy's uid\) is in use"):
            pool.lease(PINNED)
    with pool.lease(PINNED) as again:
        assert again.uid == 31_000


def test_two_pools_on_one_directory_exclude_each_other(tmp_path):
    """Two executors on the host share the lock directory, so never a uid."""
    a, b = UidPool(tmp_path / "uids"), UidPool(tmp_path / "uids")
    held = [a.lease(RANGE), b.lease(RANGE), a.lease(RANGE)]
    try:
        assert len({lease.uid for lease in held}) == 3
        with pytest.raises(CapacityError):
            b.lease(RANGE)
    finally:
        for lease in held:
            lease.release()


def test_concurrent_leases_from_threads_are_distinct(pool):
    policy = IsolationPolicy(uid_start=32_000, uid_count=16)
    got: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(16)
    leases = []
    lock = threading.Lock()

    def take() -> None:
        start.wait()
        try:
            lease = pool.lease(policy)
        except BaseException as exc:
            errors.append(exc)
            return
        with lock:
            leases.append(lease)
            got.append(lease.uid)

    threads = [threading.Thread(target=take) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors
        assert sorted(got) == list(range(32_000, 32_016))
    finally:
        for lease in leases:
            lease.release()


def test_release_on_exception_and_twice(pool):
    with pytest.raises(RuntimeError, match="task blew up"), pool.lease(PINNED) as lease:
        raise RuntimeError("task blew up")
    assert not lease.held
    lease.release()  # again: harmless
    with pool.lease(PINNED):
        pass


def test_a_released_uid_is_not_the_next_one_handed_out(pool):
    first = pool.lease(RANGE)
    first.release()
    with pool.lease(RANGE) as second:
        assert second.uid != first.uid


HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from executor.policy import IsolationPolicy
    from executor.task.uids import UidPool
    lease = UidPool(Path(sys.argv[1])).lease(IsolationPolicy(uid=int(sys.argv[2])))
    print(lease.uid, flush=True)
    time.sleep(60)
    """
)


def test_another_process_holding_a_uid_excludes_it_until_it_dies(tmp_path):
    """Across executor processes, and a killed holder gives its uid back."""
    lock_dir = tmp_path / "uids"
    src = str(Path(executor.__file__).parent.parent)
    child = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(lock_dir), "31000"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": src},
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "31000"
        with pytest.raises(CapacityError):
            UidPool(lock_dir).lease(PINNED)
    finally:
        child.send_signal(signal.SIGKILL)
        child.communicate(timeout=10)  # reaps it and closes its pipe
    with UidPool(lock_dir).lease(PINNED) as lease:
        assert lease.uid == 31_000


def test_default_uid_dir_is_host_wide_and_overridable(monkeypatch, tmp_path):
    monkeypatch.delenv(paths.ENV_UID_DIR, raising=False)
    default = paths.uid_dir()
    assert default.is_absolute()
    assert "uids" in default.name
    monkeypatch.setenv(paths.ENV_UID_DIR, str(tmp_path / "elsewhere"))
    assert paths.uid_dir() == tmp_path / "elsewhere"


# -- the executor gives the uid back on every path --------------------------------


class _Backend:
    """Just enough engine for the executor to reach the container, which fails at ``fail_at``."""

    def __init__(self, fail_at: str = "create") -> None:
        self.specs: list[ContainerSpec] = []
        self.fail_at = fail_at

    def check_image(self, image: str) -> None:
        pass

    def check_runtime(self, policy: object) -> None:
        pass

    def list_managed(self) -> list[tuple[str, dict[str, str]]]:
        return []

    def create(self, spec: ContainerSpec) -> str:
        self.specs.append(spec)
        if self.fail_at == "create":
            raise ContainerError("create refused (test)")
        return "c-1"

    def start(self, container_id: str) -> None:
        raise ContainerError("start refused (test)", container_id=container_id)

    def wait(self, container_id: str) -> ExitInfo:  # pragma: no cover - never reached
        raise AssertionError

    def kill(self, container_id: str) -> None:
        pass

    def stderr_tail(self, container_id: str, lines: int) -> str:
        return ""

    def remove(self, container_id: str) -> None:
        pass


@pytest.fixture
def short_dirs():
    root = Path(tempfile.mkdtemp(prefix="se-u-", dir="/tmp"))
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _readable_data(root: Path) -> Path:
    data = root / "data"
    data.mkdir()
    data.chmod(0o755)
    return data


@pytest.mark.parametrize("fail_at", ["create", "start"])
def test_executor_gives_the_uid_back_when_the_container_fails(short_dirs, make_protocol, fail_at):
    backend = _Backend(fail_at)
    ex = Executor(
        backend,  # type: ignore[arg-type]
        policy=PINNED,
        run_dir=short_dirs / "run",
        spool_dir=short_dirs / "spool",
        uid_dir=short_dirs / "uids",
    )
    spec = TaskSpec(protocol_dir=make_protocol(), data_dir=_readable_data(short_dirs))
    for _ in range(2):  # the second run finds the pinned uid free again
        try:
            outcome = ex.run(spec)
        except ContainerError:
            pass
        else:
            assert outcome.status is not Status.OK
    assert [s.policy.uid for s in backend.specs] == [31_000, 31_000]
    assert all(s.policy.gid == 10_001 for s in backend.specs)
    with ex.uids.lease(PINNED):
        pass


def test_unreadable_data_is_refused_before_a_uid_is_leased(short_dirs, make_protocol):
    ex = Executor(
        _Backend(),  # type: ignore[arg-type]
        run_dir=short_dirs / "run",
        spool_dir=short_dirs / "spool",
        uid_dir=short_dirs / "uids",
    )
    closed = short_dirs / "closed"
    closed.mkdir(mode=0o700)
    with pytest.raises(DataSourceError, match=r"not readable by the sandbox user \(a uid of each task's own"):
        ex.run(TaskSpec(protocol_dir=make_protocol(), data_dir=closed))
    assert not (short_dirs / "uids").exists()


def test_executor_refuses_clearly_when_every_uid_is_taken(short_dirs, make_protocol):
    ex = Executor(
        _Backend(),  # type: ignore[arg-type]
        policy=PINNED,
        run_dir=short_dirs / "run",
        spool_dir=short_dirs / "spool",
        uid_dir=short_dirs / "uids",
    )
    with ex.uids.lease(PINNED), pytest.raises(CapacityError, match="in use by another live task"):
        ex.run(TaskSpec(protocol_dir=make_protocol(), data_dir=_readable_data(short_dirs)))
    run = short_dirs / "run"
    assert not run.exists() or not any(run.iterdir())  # nothing was made


# -- the data directory check knows the shared group -------------------------------


@pytest.mark.parametrize(
    ("mode", "owner", "group", "readable"),
    [
        (0o750, 0, 10_001, True),  # the sandbox group may read: every task can
        (0o750, 0, 4242, False),  # another group: closed
        (0o705, 0, 4242, True),  # others may read
        (0o700, 30_000, 4242, True),  # the task's own uid owns it
        (0o070, 30_000, 10_001, False),  # the owner's bits rule for the owner, as in the kernel
        (0o740, 0, 10_001, False),  # read without search
    ],
)
@pytest.mark.parametrize("uid", [30_000, None])
def test_check_data_dir_applies_owner_group_other(tmp_path, mode, owner, group, readable, uid):
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, owner, group)
    data.chmod(mode)
    if uid is None and owner == 30_000:
        # A uid from the range is not known yet: only the group and others count.
        readable = bool(mode & 0o050 == 0o050)
    if readable:
        assert check_data_dir(data, uid, 10_001) == data.resolve()
    else:
        with pytest.raises(DataSourceError, match=r"chgrp 10001 and chmod g\+rx"):
            check_data_dir(data, uid, 10_001)
