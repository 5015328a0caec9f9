"""Task directories: a private token, a short socket path, and nothing left afterwards."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import executor
from executor import paths
from executor.task.bundle import copy_bundle
from executor.task.taskdir import SOCKET_NAME, TOKEN_NAME, TaskDir

SANDBOX_UID = 10_001
NOBODY = 65_534


@pytest.fixture
def base():
    """A short, private base directory in /tmp, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="se-td-", dir="/tmp"))
    yield path
    with contextlib.suppress(OSError):
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _listen(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    return sock


def test_layout_and_private_token(base):
    with TaskDir(base, SANDBOX_UID) as td:
        assert td.path.parent == base
        assert td.path.is_dir()
        assert _mode(td.path) == 0o711  # traversable, not listable
        assert _mode(td.ipc) == 0o700
        token_file = td.ipc / TOKEN_NAME
        assert _mode(token_file) == 0o600
        assert token_file.stat().st_uid == os.geteuid()
        assert token_file.read_text() == td.token
        assert td.socket_path == td.ipc / SOCKET_NAME
        assert not td.protocol.exists()  # the bundle goes there later


def test_every_task_gets_a_fresh_token_and_directory(base):
    dirs = [TaskDir(base, SANDBOX_UID) for _ in range(5)]
    try:
        assert len({d.token for d in dirs}) == 5
        assert len({d.path for d in dirs}) == 5
        assert all(len(d.token) >= 43 for d in dirs)  # 32 random bytes, URL-safe
        assert all(d.token not in d.path.name for d in dirs)
    finally:
        for d in dirs:
            d.remove()


def test_base_dir_is_created_closed_to_listing(tmp_path):
    base = tmp_path / "runs"
    with TaskDir(base, SANDBOX_UID):
        assert _mode(base) == 0o711


def test_socket_path_under_default_base_is_short_and_bindable(monkeypatch):
    monkeypatch.delenv(paths.ENV_RUN_DIR, raising=False)
    base = paths.run_dir()
    existed = base.exists()
    td = TaskDir(base, SANDBOX_UID)
    try:
        assert td.path.parent == base
        assert len(os.fsencode(td.socket_path)) < 100
        _listen(td.socket_path).close()
    finally:
        td.remove()
        if not existed:
            with contextlib.suppress(OSError):
                base.rmdir()
    assert not td.path.exists()


def test_env_overrides_the_base_dir(monkeypatch, base):
    monkeypatch.setenv(paths.ENV_RUN_DIR, str(base / "custom"))
    assert paths.run_dir() == base / "custom"
    with TaskDir(paths.run_dir(), SANDBOX_UID) as td:
        assert td.path.parent == base / "custom"


def test_grant_opens_the_socket_and_token_to_the_sandbox_only(base):
    with TaskDir(base, SANDBOX_UID) as td:
        sock = _listen(td.socket_path)
        try:
            td.grant_to_sandbox()
            modes = tuple(_mode(p) for p in (td.ipc, td.socket_path, td.ipc / TOKEN_NAME))
            if os.geteuid() == 0:
                for p in (td.ipc, td.socket_path, td.ipc / TOKEN_NAME):
                    assert (p.lstat().st_uid, p.lstat().st_gid) == (SANDBOX_UID, SANDBOX_UID)
                assert modes == (0o500, 0o600, 0o400)
            else:
                assert modes == (0o711, 0o666, 0o644)
            assert _mode(td.path) == 0o711
        finally:
            sock.close()


def test_remove_after_grant_and_read_only_bundle(base, make_protocol):
    td = TaskDir(base, SANDBOX_UID)
    copy_bundle(make_protocol(files={"pkg/mod.py": "X = 1\n"}), td.protocol)
    sock = _listen(td.socket_path)
    try:
        td.grant_to_sandbox()
    finally:
        sock.close()
    assert _mode(td.protocol) == 0o555
    td.remove()
    assert not td.path.exists()
    assert list(base.iterdir()) == []
    td.remove()  # twice is fine


_UNPRIVILEGED_SCENARIO = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from executor.task.bundle import copy_bundle
    from executor.task.taskdir import TaskDir

    base, source = Path(sys.argv[1]), Path(sys.argv[2])
    td = TaskDir(base, 10001)
    copy_bundle(source, td.protocol)
    (td.ipc / "sandbox.sock").write_text("")
    td.grant_to_sandbox()
    td.remove()
    print("left:", sorted(p.name for p in base.iterdir()))
    """
)


def _unprivileged_python() -> str | None:
    """An interpreter an unprivileged user may run; the package itself needs only the stdlib."""
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.timeout(60)
def test_remove_deletes_read_only_dirs_without_privileges(tmp_path):
    # As root, permissions never stop rmtree, so run the scenario as an ordinary user.
    work = Path(tempfile.mkdtemp(prefix="se-td-", dir="/tmp"))
    try:
        os.chmod(work, 0o755)
        source = work / "proto"
        (source / "pkg").mkdir(parents=True)
        (source / "protocol.py").write_text("def run(ctx):\n    return 1\n")
        (source / "pkg" / "mod.py").write_text("X = 1\n")
        runs = work / "runs"
        runs.mkdir()
        python, user = sys.executable, None
        if os.geteuid() == 0:
            python = _unprivileged_python() or pytest.skip("no interpreter an unprivileged user can run")
            user = NOBODY
            for p in (source, source / "pkg", runs, *source.rglob("*.py")):
                os.chown(p, NOBODY, NOBODY)
        repo = str(Path(executor.__file__).resolve().parent.parent)
        proc = subprocess.run(
            [python, "-c", _UNPRIVILEGED_SCENARIO, str(runs), str(source)],
            env={"PYTHONPATH": repo, "PATH": "/usr/bin:/bin"},
            cwd="/",
            capture_output=True,
            text=True,
            timeout=60,
            user=user,
            group=user,
            extra_groups=None if user is None else [],
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "left: []"
    finally:
        for root, dirs, _ in os.walk(work):
            for d in dirs:
                with contextlib.suppress(OSError):
                    os.chmod(os.path.join(root, d), 0o700)
        shutil.rmtree(work, ignore_errors=True)


def _blow_up_inside(taskdir: TaskDir) -> None:
    """Use ``taskdir`` as a context manager whose body writes a file, then raises."""
    with taskdir as td:
        (td.ipc / "scratch").write_text("x")
        raise RuntimeError("task blew up")


def test_context_manager_removes_the_directory_on_exception(base):
    taskdir = TaskDir(base, SANDBOX_UID)
    with pytest.raises(RuntimeError, match="task blew up"):
        _blow_up_inside(taskdir)
    assert not taskdir.path.exists()
    assert list(base.iterdir()) == []


class _NoContainers:
    def list_managed(self):
        return []


def test_reaper_spares_fresh_unlabelled_dirs_and_live_owners(tmp_path):
    import os

    from executor.task.reaper import new_instance_id, reap

    run_dir, spool = tmp_path / "run", tmp_path / "spool"
    run_dir.mkdir()
    spool.mkdir()
    fresh = run_dir / "t-being-made"  # no owner file yet: another executor is making it
    fresh.mkdir()
    old = run_dir / "t-old-unlabelled"
    old.mkdir()
    os.utime(old, (0, 0))
    live = TaskDir(run_dir, 10_001, new_instance_id())  # this process: alive
    dead = TaskDir(run_dir, 10_001, f"{os.uname().nodename}:999999999:1:x")  # no such pid
    try:
        report = reap(_NoContainers(), run_dir, spool)
        assert sorted(report.task_dirs) == sorted([str(old), str(dead.path)])
        assert fresh.exists()
        assert live.path.exists()
        assert not old.exists()
        assert not dead.path.exists()
    finally:
        live.remove()
        dead.remove()


def test_an_empty_read_only_resolv_conf_for_the_sandbox(base):
    """Mounted over /etc/resolv.conf: the host's resolver is none of the sandbox's business."""
    with TaskDir(base, SANDBOX_UID) as td:
        assert td.resolv_conf.parent == td.path
        assert td.resolv_conf.read_bytes() == b""
        assert _mode(td.resolv_conf) == 0o444
    assert not td.resolv_conf.exists()


def test_grant_gives_the_ipc_files_to_the_task_uid_and_nothing_to_the_shared_group(base):
    if os.geteuid() != 0:
        pytest.skip("chown needs root")
    with TaskDir(base, 30_000, sandbox_gid=SANDBOX_UID) as td:
        sock = _listen(td.socket_path)
        try:
            td.grant_to_sandbox()
        finally:
            sock.close()
        for p in (td.ipc, td.socket_path, td.ipc / TOKEN_NAME):
            assert (p.lstat().st_uid, p.lstat().st_gid) == (30_000, SANDBOX_UID)
            assert _mode(p) & 0o077 == 0  # other tasks share the group: it gets nothing
