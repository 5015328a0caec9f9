"""The sandbox's seccomp profile, in real sandboxes under runc and gVisor.

A data view's file shares the operator's inode, so a lock, lease or watch
taken on it inside must reach no one outside: under runc the profile refuses
them (EPERM); under gVisor its own kernel keeps them inside, and gVisor
registered with ``--oci-seccomp`` refuses them too. Each run also locks and
reads the original file from outside while the sandbox holds what it got.

A policy's own profile is enforced under both runtimes, keeping the default's
refusals, or (gVisor registered without ``--oci-seccomp``, which would ignore
it) refused before anything starts, in one line that names the fix.

Which runtime ran is the engine's record of the container, not the outcome's echo.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import struct
import threading
from typing import TYPE_CHECKING, Any

import pytest

from executor.backends.docker import RUNSC_IGNORES_SECCOMP
from executor.errors import PolicyError
from executor.outcome import Status
from executor.policy import IsolationPolicy, seccomp, syscalls
from executor.spec import TaskSpec

from ..conftest import PROTOCOLS
from ..engine import RecordingBackend
from ..seccomp_filter import RET_ALLOW, RET_ERRNO, decide, read_filters, syscall_numbers

if TYPE_CHECKING:
    from pathlib import Path

    from executor.events import ProgressUpdate

pytestmark = pytest.mark.security

RUNTIMES = ["runc", "runsc"]
TIMEOUT_S = 60.0
PIDS = {"runc": 64, "runsc": 128}  # gVisor's own threads count against the cap
LOCKS_PROBE = PROTOCOLS / "locks_probe"
REFUSED_INSIDE = [
    "flock_ex",
    "flock_sh",
    "F_GETLK",
    "F_SETLK",
    "F_SETLKW",
    "F_OFD_GETLK",
    "F_OFD_SETLK",
    "F_SETLEASE",
    "F_GETLEASE",
    "F_NOTIFY",
    "inotify_init1",
    "inotify_init",
    "inotify_add_watch",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
]
EPERM = "EPERM"


def _profiles_applied(docker_client: Any, runtime: str) -> bool:
    """Whether the engine's ``runtime`` applies a container's seccomp profile (fails if it has none)."""
    runtimes = docker_client.info().get("Runtimes", {})
    if runtime not in runtimes:
        pytest.fail(f"the engine has no {runtime!r} runtime: run `make runsc` (as root)")
    if runtime == "runc":
        return True
    return seccomp.runsc_applies_profiles(runtimes[runtime].get("runtimeArgs") or [])


def _policy(runtime: str, **changes: Any) -> IsolationPolicy:
    return IsolationPolicy.hardened().replace(
        runtime=runtime, timeout_s=TIMEOUT_S, pids=PIDS[runtime], **changes
    )


@pytest.fixture
def shared_data(tmp_path: Path) -> Path:
    """A datasource the operator keeps using: a plain file and a SQLite database, readable by the sandbox."""
    data = tmp_path / "shared"
    data.mkdir()
    (data / "records.csv").write_text("id,value\n1,2\n")
    with sqlite3.connect(data / "records.db") as conn:
        conn.execute("create table t (x)")
        conn.execute("insert into t values (1)")
    conn.close()
    for path in data.iterdir():
        path.chmod(0o644)
    data.chmod(0o755)
    return data


def _lock_from_outside(path: Path) -> dict[str, str]:
    """What the operator gets when it locks ``path`` for writing at once: "ok" or the error.

    Each kind on a descriptor of its own, closed after (which drops the lock):
    the kinds would otherwise meet each other.
    """
    attempts = {
        "flock": lambda fd: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB),
        "F_SETLK": lambda fd: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB),
        "F_OFD_SETLK": lambda fd: fcntl.fcntl(fd, 37, struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)),
    }
    out = {}
    for label, attempt in attempts.items():
        fd = os.open(path, os.O_RDWR)
        try:
            attempt(fd)
            out[label] = "ok"
        except OSError as exc:
            out[label] = os.strerror(exc.errno)
        finally:
            os.close(fd)
    return out


def _write_from_outside(db: Path) -> str:
    """The operator's SQLite writer, never waiting: "ok" or its error."""
    try:
        conn = sqlite3.connect(db, timeout=0)
        try:
            with conn:
                conn.execute("insert into t values (2)")
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_sandbox_cannot_lock_lease_or_watch_the_operators_files(
    runtime, docker_client, make_executor, shared_data
):
    applied = _profiles_applied(docker_client, runtime)
    outside: dict[str, Any] = {}
    seen = threading.Event()

    def on_progress(update: ProgressUpdate) -> None:
        if update.info != "holding" or seen.is_set():
            return
        # The sandbox now holds whatever it got: the operator locks, writes and reads its own files.
        outside["locks"] = _lock_from_outside(shared_data / "records.csv")
        outside["db_locks"] = _lock_from_outside(shared_data / "records.db")
        outside["sqlite"] = _write_from_outside(shared_data / "records.db")
        (shared_data / "records.csv").read_text()
        seen.set()

    backend = RecordingBackend()
    executor = make_executor(policy=_policy(runtime), backend=backend)
    outcome = executor.run(
        TaskSpec(
            protocol_dir=LOCKS_PROBE,
            data_dir=shared_data,
            parameters={"file": "records.csv", "db": "records.db", "hold_s": 2},
        ),
        on_progress=on_progress,
    )
    assert [c.runtime for c in backend.containers] == [runtime]
    assert outcome.status is Status.OK, outcome.error  # the runtime (grpc and all) booted and ran
    assert seen.is_set(), "the probe never said it was holding"
    result = outcome.result
    # Nothing the sandbox did reached the operator's inode.
    assert outside["locks"] == {"flock": "ok", "F_SETLK": "ok", "F_OFD_SETLK": "ok"}, outside
    assert outside["db_locks"] == {"flock": "ok", "F_SETLK": "ok", "F_OFD_SETLK": "ok"}, outside
    assert outside["sqlite"] == "ok", outside
    assert result["watch_saw_outside_access"] is False
    # What protocols, glibc and grpc need of fcntl still works.
    assert set(result["still_works"].values()) == {"ok"}, result["still_works"]
    if applied:
        calls = result["calls"]
        expected = {name: EPERM for name in REFUSED_INSIDE}
        if "absent" in calls["inotify_init"]:
            expected["inotify_init"] = calls["inotify_init"]  # arm64 has only inotify_init1
        assert calls == expected
        # SQLite's own locking is refused with a clear error; a read without locks works.
        assert result["sqlite"] == {
            "default": "OperationalError: access permission denied",
            "immutable": 1,
            "nolock": 1,
        }


def _all_syscalls_but(refused: set[str]) -> str:
    """An allow-list profile: every x86-64 call the headers name but ``refused``."""
    names = sorted(set(syscall_numbers("x86_64")) - refused)
    assert len(names) > 300
    return json.dumps(
        {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}]}
    )


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_policys_profile_refusing_symlink_is_enforced_or_refused_at_start(
    runtime, docker_client, make_executor, data_dir
):
    applied = _profiles_applied(docker_client, runtime)
    policy = _policy(runtime, seccomp_profile=_all_syscalls_but({"symlink", "symlinkat"}))
    backend = RecordingBackend()
    executor = make_executor(policy=policy, backend=backend)
    spec = TaskSpec(protocol_dir=LOCKS_PROBE, data_dir=data_dir, parameters={"mode": "symlink"})
    if not applied:
        # gVisor would ignore the profile: nothing starts, and the error says how to fix it.
        with pytest.raises(PolicyError) as info:
            executor.run(spec)
        assert str(info.value) == RUNSC_IGNORES_SECCOMP
        assert "\n" not in str(info.value)
        assert backend.containers == []
        return
    outcome = executor.run(spec)
    assert [c.runtime for c in backend.containers] == [runtime]
    assert outcome.status is Status.OK, outcome.error
    # The profile's own refusal, and the default's, which the profile allowed.
    assert outcome.result == {"symlink": EPERM, "flock": EPERM}


# -- runc: the compiled filter, against the engine's own default -----------------------------

ARG0 = (0, 8, 0x2_0000, 0x2_0008, 0xFFFF_FFFF, 0x0120_0011, 0x003D_0F00, 0x0120_0011 | syscalls.CLONE_NEWUSER)
ARG1 = (*range(0, 40), *range(1024, 1040), 2**32 + 3)


def _command(abi: str, value: int) -> int:
    """The fcntl command a filter sees: the 32-bit ABIs' filters compare the low 32 bits only."""
    return value if abi == "x86_64" else value & 0xFFFF_FFFF


def _filters_of(docker_client: Any, profile: str | None) -> list[list[tuple[int, int, int, int]]]:
    """runc's seccomp filters for a capability-less container under ``profile`` (None: the engine's own)."""
    security_opt = ["no-new-privileges:true"] + ([f"seccomp={profile}"] if profile else [])
    container = docker_client.containers.run(
        "sandbox-executor/sandbox:latest",
        ["sleep", "60"],
        detach=True,
        network_mode="none",
        cap_drop=["ALL"],
        security_opt=security_opt,
        runtime="runc",
        labels={"io.sandbox-executor.test": "seccomp-filter"},
    )
    try:
        container.reload()
        return read_filters(int(container.attrs["State"]["Pid"]))
    finally:
        container.remove(force=True)


def _answers(programs: list[list[tuple[int, int, int, int]]]) -> dict[tuple[str, str, tuple[int, ...]], int]:
    out = {}
    for abi in ("x86_64", "x32", "i386"):
        for name, nr in syscall_numbers(abi).items():
            grid: tuple[tuple[int, ...], ...] = ((0,) * 6,)
            if name in ("personality", "clone"):
                grid = tuple((a, 0) for a in ARG0)
            elif name in syscalls.FCNTL_NAMES:
                grid = tuple((3, c) for c in ARG1)
            for args in grid:
                out[(abi, name, args)] = decide(programs, abi, nr, args)
    return out


@pytest.mark.skipif(os.geteuid() != 0, reason="reading a process's seccomp filter needs root (ptrace)")
def test_the_default_is_the_engines_own_less_the_refusals(docker_client):
    """Call by call on every x86 ABI, runc's filter for our profile answers as the engine's default
    would, except EPERM for the refused calls and fcntl commands; with those put back, exactly as it."""
    ours = seccomp.default_profile("runc")
    restored = dict(ours)
    restored["syscalls"] = [r for r in ours["syscalls"] if r["names"] != list(syscalls.FCNTL_NAMES)]
    restored["syscalls"].append(
        {"names": [*syscalls.REFUSED, *syscalls.FCNTL_NAMES], "action": "SCMP_ACT_ALLOW", "args": []}
    )
    engine = _answers(_filters_of(docker_client, None))
    assert _answers(_filters_of(docker_client, json.dumps(restored))) == engine
    differ = {
        key: (engine[key], got)
        for key, got in _answers(_filters_of(docker_client, json.dumps(ours))).items()
        if got != engine[key]
    }
    expected = {
        (abi, name, args): (RET_ALLOW, RET_ERRNO | 1)
        for abi, name, args in engine
        if name in syscalls.REFUSED
        or (name in syscalls.FCNTL_NAMES and _command(abi, args[1]) not in syscalls.FCNTL_ALLOWED)
    }
    assert differ == expected
    # Every ABI's refused calls were among them (the i386 ones through int 0x80 too).
    assert {abi for abi, name, _ in differ if name == "flock"} == {"x86_64", "x32", "i386"}
