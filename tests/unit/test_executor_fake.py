"""Executor.run on a scripted engine: the real server, session, lifeline, init and runtime; no Docker.

:func:`executor.testing.host_runtime` runs the container's command (our init,
then the child runtime) as host processes, so everything but the isolation
is real. Every test's executor has private run, spool and uid directories,
and afterwards nothing may remain in them: no task directory, no spool, no
uid lease, no running server.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from executor import runner as executor_module
from executor.backends import LABEL_WARM, LABEL_WIRE, ExitInfo
from executor.errors import ContainerError, HostError, ImageNotFoundError, ProtocolBundleError
from executor.mailbox.crypto import TaskKeys
from executor.outcome import Status
from executor.policy import IsolationPolicy
from executor.rpc.server import TaskServer
from executor.runner import Executor
from executor.sandbox.contract import START_SOCKET_NAME
from executor.spec import TaskSpec
from executor.task import assembly
from executor.task import supervisor as supervisor_module
from executor.task.launch import SANDBOX_IPC
from executor.task.run import TaskRun
from executor.testing import (
    FakeBackend,
    FakeContainer,
    InMemoryTransport,
    LocalModeller,
    Program,
    exits,
    host_runtime,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from executor.events import ProgressUpdate
    from executor.mailbox.transport import Transport

pytestmark = pytest.mark.timeout(120)

# One uid only: a lease that is not given back makes the next lease fail.
POLICY = IsolationPolicy.hardened().replace(
    heartbeat_interval_s=0.05, heartbeat_timeout_s=10, timeout_s=60, uid_start=30001, uid_count=1
)


@dataclass
class Kit:
    """What a test's executors were built with, to check afterwards."""

    run_dir: Path
    spool_dir: Path
    uid_dir: Path
    scratch: Path
    servers: list[TaskServer] = field(default_factory=list)
    executors: list[Executor] = field(default_factory=list)

    def executor(
        self, backend: FakeBackend, *, policy: IsolationPolicy = POLICY, transport: Transport | None = None
    ) -> Executor:
        ex = Executor(
            backend,
            policy=policy,
            transport=transport,
            run_dir=self.run_dir,
            spool_dir=self.spool_dir,
            uid_dir=self.uid_dir,
        )
        self.executors.append(ex)
        return ex

    def runtime(self) -> Program:
        return host_runtime(self.scratch)


@pytest.fixture
def kit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Kit]:
    # Short: the task's socket path must fit a sockaddr_un.
    run_dir = Path(tempfile.mkdtemp(prefix="se-", dir="/tmp"))
    kit = Kit(run_dir, tmp_path / "spool", tmp_path / "uids", tmp_path / "scratch")
    real_init = TaskServer.__init__

    def recording_init(self: TaskServer, *args: Any, **kwargs: Any) -> None:
        real_init(self, *args, **kwargs)
        kit.servers.append(self)

    monkeypatch.setattr(TaskServer, "__init__", recording_init)
    try:
        yield kit
        for ex in kit.executors:
            ex.close()
        leftovers = sorted(str(p) for p in run_dir.iterdir())
        spools = sorted(str(p) for p in kit.spool_dir.iterdir()) if kit.spool_dir.exists() else []
        assert not leftovers, f"task directories left behind: {leftovers}"
        assert not spools, f"spools left behind: {spools}"
        # A stopped server has removed its socket (a warm slot's too, task or none).
        assert not [s for s in kit.servers if s.socket_path.exists()], "a task server was never stopped"
        with executor_module.UidPool(kit.uid_dir).lease(POLICY):
            pass  # the task's uid was given back
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    (d / "scans").mkdir(parents=True)
    (d / "a.csv").write_text("x\n1\n")
    (d / "scans" / "b.csv").write_text("x\n2\n")
    for p in (d, d / "scans"):
        p.chmod(0o755)
    return d


def _spec(make_protocol: Callable[..., Path], data: Path, source: str, **kwargs: Any) -> TaskSpec:
    return TaskSpec(protocol_dir=make_protocol(source), data_dir=data, **kwargs)


# -- the real runtime on the host --------------------------------------------------------


def test_a_warm_slot_boots_the_real_runtime_which_waits_and_then_runs_its_task(kit, make_protocol, data):
    # The runtime's warm path without Docker: it opens its connection, waits on
    # its start line, and gets its configuration down it when a task takes the slot.
    ex = kit.executor(FakeBackend(kit.runtime()), policy=POLICY.replace(warm_pool=1, uid_count=2))
    assert ex.warm_up(wait=30), ex.pool_stats()
    (slot,) = ex.pool_stats()[0]["slots"]
    outcome = ex.run(_spec(make_protocol, data, OK_PROTOCOL, task_id="t-warm", parameters={"epochs": 2}))
    assert outcome.status is Status.OK, outcome.error
    assert outcome.result == {"epochs": 2, "task": "t-warm"}
    assert outcome.warm_starts == 1
    assert {"assign", "load", "run"} <= set(outcome.timings)
    assert "create" not in outcome.timings
    assert ex.backend.containers[slot["container_id"]].removed  # type: ignore[attr-defined]


def test_a_task_served_by_a_warm_slot_makes_no_ipc_directory_of_its_own(
    kit, make_protocol, data, monkeypatch
):
    # Its own directory held a token, sockets' directory and resolv.conf no
    # warm batch uses; now only its bundle (the slot links it). Made to fail
    # by making the task directory with its IPC part again.
    seen: list[list[str]] = []
    real_run = TaskRun.run

    def run(self: TaskRun) -> Any:
        seen.append(sorted(p.name for p in self.workspace.path.iterdir()))
        return real_run(self)

    monkeypatch.setattr(TaskRun, "run", run)
    ex = kit.executor(FakeBackend(kit.runtime()), policy=POLICY.replace(warm_pool=1, uid_count=2))
    assert ex.warm_up(wait=30), ex.pool_stats()
    outcome = ex.run(_spec(make_protocol, data, OK_PROTOCOL, task_id="t-warm", parameters={"epochs": 1}))
    assert outcome.status is Status.OK, outcome.error
    assert outcome.warm_starts == 1
    assert seen == [["owner", "protocol"]]


def _warm_or(cold: Program, warm: Program) -> Program:
    """``warm`` in a pool's slot containers, ``cold`` in a task's own."""

    def program(container: FakeContainer) -> ExitInfo | None:
        return (warm if container.spec.labels.get(LABEL_WARM) == "true" else cold)(container)

    return program


def _dies_at_hand_over(container: FakeContainer) -> ExitInfo:
    """A warm sandbox that waits on its start line, then dies as its task arrives (before any beat)."""
    ipc = next(m.source for m in container.spec.mounts if m.target == SANDBOX_IPC)
    line = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        line.connect(str(ipc / START_SOCKET_NAME))
        line.settimeout(30)
        line.recv(1)  # GO, then the configuration: never read, never beaten for
    except OSError:
        pass
    finally:
        line.close()
    container.write("stderr", "sandbox: died at the hand-over\n")
    return ExitInfo(1)


def _boots_late(delay_s: float, then_run: Program) -> Program:
    """A warm sandbox whose runtime reaches its start line only after ``delay_s``."""

    def program(container: FakeContainer) -> ExitInfo | None:
        if container.wait_killed(delay_s):
            return None
        return then_run(container)

    return program


def test_a_warm_slot_that_dies_at_the_hand_over_sends_its_task_elsewhere(kit, make_protocol, data):
    backend = FakeBackend(_warm_or(kit.runtime(), _dies_at_hand_over))
    ex = kit.executor(backend, policy=POLICY.replace(warm_pool=1, uid_count=3))
    assert ex.warm_up(wait=30), ex.pool_stats()
    (slot,) = ex.pool_stats()[0]["slots"]
    outcome = ex.run(_spec(make_protocol, data, OK_PROTOCOL, task_id="t-moved", parameters={"epochs": 1}))
    # The slot took nothing of the task: it ran, once, in a sandbox of its own.
    assert outcome.status is Status.OK, outcome.error
    assert outcome.result == {"epochs": 1, "task": "t-moved"}
    assert outcome.warm_starts == 0
    assert backend.containers[slot["container_id"]].removed
    cold = [c for c in backend.containers.values() if c.spec.labels.get(LABEL_WARM) != "true"]
    assert len(cold) == 1
    assert cold[0].removed


def test_a_slot_still_booting_is_never_handed_a_task(kit, make_protocol, data):
    # Taken before its runtime reached the start line, a slot once kept its
    # task until the heartbeat timeout. A booting slot is not taken now: the
    # task starts cold, or takes the slot once it waits.
    backend = FakeBackend(_warm_or(kit.runtime(), _boots_late(1.5, kit.runtime())))
    ex = kit.executor(backend, policy=POLICY.replace(warm_pool=1, uid_count=3, heartbeat_timeout_s=3))
    ex.warm_up()
    # The slot's container runs; its runtime has not reached the start line yet.
    assert _wait(lambda: ex.pool_stats()[0]["made"] == 1 and ex.pool_stats()[0]["ready"] == 0, 10)
    outcome = ex.run(_spec(make_protocol, data, OK_PROTOCOL, task_id="t-early", parameters={"epochs": 1}))
    assert outcome.status is Status.OK, outcome.error


def test_a_warm_task_holds_no_uid_but_its_slots_so_the_pool_refills_meanwhile(kit, make_protocol, data):
    # Two uids: the taken slot's and its replacement's. A task that leased one
    # of its own besides would leave the refill none.
    ex = kit.executor(FakeBackend(kit.runtime()), policy=POLICY.replace(warm_pool=1, uid_count=2))
    assert ex.warm_up(wait=30), ex.pool_stats()
    waits = (
        "import time\n"
        "def run(ctx):\n"
        "    deadline = time.monotonic() + 20\n"
        "    while time.monotonic() < deadline and not (ctx.scratch_dir / 'go').exists():\n"
        "        time.sleep(0.02)\n"
        "    return 'done'\n"
    )
    box: list[Any] = []
    thread = threading.Thread(
        target=lambda: box.append(ex.run(_spec(make_protocol, data, waits, task_id="t-hold"))), daemon=True
    )
    thread.start()
    refilled = _wait(lambda: ex.pool_stats()[0]["taken"] == 1 and ex.pool_stats()[0]["ready"] == 1, 30)
    kit.scratch.mkdir(exist_ok=True)
    (kit.scratch / "go").touch()  # the host runtime's scratch_dir (a fake engine shares one)
    thread.join(30)
    assert refilled, ex.pool_stats()
    assert box, "the task did not end within 30 s"
    assert box[0].status is Status.OK, box[0].error
    assert box[0].warm_starts == 1, box[0]


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            return False
        time.sleep(0.02)
    return True


OK_PROTOCOL = """
def run(ctx):
    ctx.progress.run_start()
    for i, name in enumerate(["a.csv", "scans/b.csv"], 1):
        (ctx.data_dir / name).read_text()
        ctx.file_processed(name)
        ctx.progress.step(i, 2, info=name)
    ctx.file_failed("a.csv", "re-read and found wanting")
    ctx.mailbox.send_training_update(b"weights" * 1000)
    ctx.progress.run_end()
    return {"epochs": ctx.parameters["epochs"], "task": ctx.task_id}
"""


def test_a_task_runs_through_the_real_server_init_and_runtime(kit, make_protocol, data, tmp_path):
    transport = InMemoryTransport(spool_dir=tmp_path / "transport")
    modeller = LocalModeller(transport, spool_dir=tmp_path / "modeller")
    keys = TaskKeys.generate()
    modeller.add_task("t-ok", keys)
    seen: list[ProgressUpdate] = []
    try:
        ex = kit.executor(FakeBackend(kit.runtime()), transport=transport)
        spec = _spec(make_protocol, data, OK_PROTOCOL, task_id="t-ok", parameters={"epochs": 3}, keys=keys)
        outcome = ex.run(spec, on_progress=seen.append)
        assert outcome.status is Status.OK, outcome.error
        assert outcome.result == {"epochs": 3, "task": "t-ok"}
        assert [u.kind for u in seen] == ["RUN_START", "STEP", "STEP", "RUN_END"]
        assert [u.info for u in seen if u.kind == "STEP"] == ["a.csv", "scans/b.csv"]
        assert outcome.to_dict()["files"] == {
            "processed": 1,
            "failed": {"a.csv": "re-read and found wanting"},
        }
        message = modeller.receive("t-ok", 5)
        assert message is not None
        assert (message.type, message.read()) == (
            "TRAINING_UPDATE",
            b"weights" * 1000,
        )
        assert {"create", "start", "boot", "import", "config", "load", "run", "total"} <= set(outcome.timings)
        assert not ex.backend.only().killed  # type: ignore[attr-defined]
    finally:
        modeller.close()
        transport.close()


def test_an_exception_in_the_protocol_is_an_error_with_its_traceback(kit, make_protocol, data):
    ex = kit.executor(FakeBackend(kit.runtime()))
    outcome = ex.run(_spec(make_protocol, data, "def run(ctx):\n    raise KeyError('no label')\n"))
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert outcome.error.type == "KeyError"
    assert "raise KeyError" in outcome.error.traceback


def test_an_abort_is_abort_with_its_reason(kit, make_protocol, data):
    ex = kit.executor(FakeBackend(kit.runtime()))
    outcome = ex.run(_spec(make_protocol, data, "def run(ctx):\n    ctx.abort('no data', reason='NoData')\n"))
    assert outcome.status is Status.ABORT
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.message) == ("NoData", "no data")


def test_a_sandbox_that_dies_without_a_result_reports_its_exit_code_and_last_words(kit, make_protocol, data):
    source = (
        "import os, sys\n\ndef run(ctx):\n    sys.stderr.write('fatal: out of luck\\n')\n"
        "    sys.stderr.flush()\n    os._exit(3)\n"
    )
    ex = kit.executor(FakeBackend(kit.runtime()))
    outcome = ex.run(_spec(make_protocol, data, source))
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.exit_code) == ("ContainerExited", 3)
    assert "fatal: out of luck" in outcome.error.stderr_tail


def test_a_frozen_sandbox_times_out_and_the_modeller_is_told(kit, make_protocol, data, tmp_path):
    transport = InMemoryTransport(spool_dir=tmp_path / "transport")
    modeller = LocalModeller(transport, spool_dir=tmp_path / "modeller")
    keys = TaskKeys.generate()
    modeller.add_task("t-frozen", keys)
    # SIGSTOP freezes every thread, the heartbeat's too.
    source = "import os, signal\n\ndef run(ctx):\n    os.kill(os.getpid(), signal.SIGSTOP)\n"
    try:
        ex = kit.executor(
            FakeBackend(kit.runtime()), transport=transport, policy=POLICY.replace(heartbeat_timeout_s=1)
        )
        outcome = ex.run(_spec(make_protocol, data, source, task_id="t-frozen", keys=keys))
        assert outcome.status is Status.TIMEOUT
        assert outcome.error is not None
        assert outcome.error.type == "HeartbeatTimeout"
        assert ex.backend.only().killed  # type: ignore[attr-defined]
        message = modeller.receive("t-frozen", 5)
        assert message is not None
        assert message.type == "TASK_ABORT"
        assert json.loads(message.read())["reason"] == "LimitsExceeded"
    finally:
        modeller.close()
        transport.close()


def _cancel_on_run_start(cancel: threading.Event) -> Callable[[ProgressUpdate], None]:
    def on_progress(update: ProgressUpdate) -> None:
        if update.kind == "RUN_START":
            cancel.set()

    return on_progress


@pytest.fixture(params=["default", "ignored"])
def inherited_sigint(request: pytest.FixtureRequest) -> Iterator[None]:
    """The SIGINT disposition the sandbox's processes inherit from whatever started them.

    A shell's background job, ``nohup`` and some CI runners start everything
    with SIGINT ignored, and an ignored signal stays ignored across fork and
    exec: the host runtime here inherits it from this process (a Python
    handler, by contrast, reaches it as the default).
    """
    disposition = signal.SIG_IGN if request.param == "ignored" else signal.default_int_handler
    previous = signal.signal(signal.SIGINT, disposition)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_cancelled_protocol_stops_gracefully_and_is_not_killed(kit, make_protocol, data, inherited_sigint):
    source = "import time\n\ndef run(ctx):\n    ctx.progress.run_start()\n    time.sleep(60)\n"
    cancel = threading.Event()
    ex = kit.executor(FakeBackend(kit.runtime()))
    outcome = ex.run(
        _spec(make_protocol, data, source), cancel=cancel, on_progress=_cancel_on_run_start(cancel)
    )
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert outcome.error.type == "Cancelled"
    # The protocol was interrupted and the runtime reported it: no kill was needed to stop it.
    (server,) = kit.servers
    assert server.session.finish is not None
    assert server.session.finish.error_type == "Cancelled"


def test_a_protocol_that_ignores_the_cancel_is_killed(kit, make_protocol, data, monkeypatch):
    monkeypatch.setattr(supervisor_module, "CANCEL_GRACE_S", 0.5)
    source = (
        "import signal, time\n\ndef run(ctx):\n    signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "    ctx.progress.run_start()\n    while True:\n        time.sleep(0.05)\n"
    )
    cancel = threading.Event()
    ex = kit.executor(FakeBackend(kit.runtime()))
    outcome = ex.run(
        _spec(make_protocol, data, source), cancel=cancel, on_progress=_cancel_on_run_start(cancel)
    )
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert outcome.error.type == "Cancelled"
    (server,) = kit.servers
    assert server.session.finish is None, "the protocol ignored the cancel, yet a result came"
    assert ex.backend.only().killed  # type: ignore[attr-defined]


# -- failure paths: nothing left behind ----------------------------------------------------


def test_an_engine_refusing_the_create_leaves_nothing_behind(kit, make_protocol, data):
    backend = FakeBackend(exits(0), create_errors=[ContainerError("container create failed: 409 Conflict")])
    with pytest.raises(ContainerError):
        kit.executor(backend).run(_spec(make_protocol, data, "def run(ctx):\n    return 1\n"))
    assert backend.containers == {}
    assert kit.servers, "the failure came before the server: this test no longer tests its cleanup"


def test_an_engine_refusing_the_start_removes_the_container_and_leaves_nothing_behind(
    kit, make_protocol, data
):
    backend = FakeBackend(exits(0), start_errors=[ContainerError("container start failed: 500 Server Error")])
    with pytest.raises(ContainerError):
        kit.executor(backend).run(_spec(make_protocol, data, "def run(ctx):\n    return 1\n"))
    assert backend.all_removed()
    assert backend.containers


@pytest.mark.parametrize(
    ("images", "says"),
    [([], "is not built"), ({POLICY.image: {LABEL_WIRE: "0"}}, "built for wire version 0")],
    ids=["missing", "another wire version"],
)
def test_a_missing_image_is_refused_before_anything_is_made(kit, make_protocol, data, images, says):
    backend = FakeBackend(exits(0), images=images)
    with pytest.raises(ImageNotFoundError, match=says):
        kit.executor(backend).run(_spec(make_protocol, data, "def run(ctx):\n    return 1\n"))
    assert [op for op, _ in backend.calls] == ["check_image"]


def test_a_protocol_without_run_is_refused_before_anything_is_made(kit, make_protocol, data):
    backend = FakeBackend(exits(0))
    with pytest.raises(ProtocolBundleError, match="defines no top-level run"):
        kit.executor(backend).run(_spec(make_protocol, data, "def train(ctx):\n    return 1\n"))
    assert backend.calls == []
    assert list(kit.run_dir.iterdir()) == []


def test_a_bundle_refused_during_the_copy_leaves_nothing_behind(kit, make_protocol, data, tmp_path):
    protocol = make_protocol("def run(ctx):\n    return 1\n")
    # A hard link passes the pre-check but not the copy (it could name a file the operator never shared).
    secret = tmp_path / "secret.txt"
    secret.write_text("root only")
    os.link(secret, protocol / "helper.txt")
    backend = FakeBackend(exits(0))
    with pytest.raises(ProtocolBundleError):
        kit.executor(backend).run(TaskSpec(protocol_dir=protocol, data_dir=data))
    assert backend.containers == {}


def test_a_socket_that_cannot_be_bound_leaves_nothing_behind(kit, make_protocol, data):
    # A run directory so deep that the task's socket path cannot fit a sockaddr_un.
    deep = kit.run_dir / ("d" * 100)
    deep.mkdir()
    ex = Executor(
        FakeBackend(exits(0)), policy=POLICY, run_dir=deep, spool_dir=kit.spool_dir, uid_dir=kit.uid_dir
    )
    kit.executors.append(ex)
    with pytest.raises(HostError) as info:
        ex.run(_spec(make_protocol, data, "def run(ctx):\n    return 1\n"))
    assert str(info.value).startswith(f"cannot listen on {deep}/t-")
    assert info.value.path.endswith("/ipc/sandbox.sock")
    assert "\n" not in str(info.value)
    assert not ex.backend.containers  # type: ignore[attr-defined]
    leftovers = list(deep.iterdir())
    shutil.rmtree(deep)
    assert leftovers == []


def _blocked(tmp_path: Path) -> Path:
    """A directory path no one can make, root included: its parent is a regular file."""
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "dir"


def test_a_run_directory_the_host_refuses_is_a_host_error_naming_it(kit, make_protocol, data, tmp_path):
    run_dir = _blocked(tmp_path)
    backend = FakeBackend(exits(0))
    ex = Executor(backend, policy=POLICY, run_dir=run_dir, spool_dir=kit.spool_dir, uid_dir=kit.uid_dir)
    kit.executors.append(ex)
    with pytest.raises(HostError) as info:
        ex.run(_spec(make_protocol, data, "def run(ctx):\n    return 1\n"))
    assert str(info.value) == f"cannot make a task directory in {run_dir}: Not a directory"
    assert info.value.path == str(run_dir)
    assert isinstance(info.value.__cause__, OSError)
    assert backend.containers == {}


def test_a_spool_directory_the_host_refuses_is_a_host_error_and_leaves_nothing_behind(
    kit, make_protocol, data, tmp_path
):
    spool_dir = _blocked(tmp_path)
    backend = FakeBackend(exits(0))
    ex = Executor(backend, policy=POLICY, run_dir=kit.run_dir, spool_dir=spool_dir, uid_dir=kit.uid_dir)
    kit.executors.append(ex)
    with pytest.raises(HostError) as info:
        ex.run(_spec(make_protocol, data, "def run(ctx):\n    return 1\n"))
    assert str(info.value).startswith(f"cannot make the mailbox spool {spool_dir}/t-")
    assert str(info.value).endswith(": Not a directory")
    assert backend.containers == {}


def test_a_lifeline_that_cannot_be_bound_is_a_host_error_and_leaves_nothing_behind(
    kit, make_protocol, data, monkeypatch
):
    def refuse(path: Path) -> None:
        raise OSError(98, "Address already in use")

    monkeypatch.setattr(assembly, "Lifeline", refuse)
    backend = FakeBackend(exits(0))
    with pytest.raises(HostError) as info:
        kit.executor(backend).run(_spec(make_protocol, data, "def run(ctx):\n    return 1\n"))
    assert str(info.value).startswith("cannot listen on ")
    assert str(info.value).endswith("/ipc/lifeline.sock: Address already in use")
    assert kit.servers, "the failure came before the server: this test no longer tests its cleanup"
    assert backend.containers == {}


def test_a_task_after_a_failed_one_gets_the_uid_back(kit, make_protocol, data):
    backend = FakeBackend(exits(0), start_errors=[ContainerError("container start failed: 500 Server Error")])
    ex = kit.executor(backend)
    spec = _spec(make_protocol, data, "def run(ctx):\n    return 1\n")
    with pytest.raises(ContainerError):
        ex.run(spec)
    # The policy's range holds one uid: this run needs the failed task's.
    outcome = ex.run(spec)
    assert outcome.status is Status.ERROR  # exits(0) reports nothing
    assert outcome.error is not None
    assert outcome.error.type == "ContainerExited"


# -- the host refusing what the executor needs before a task --------------------------------


def test_a_lock_directory_the_host_refuses_is_a_host_error_naming_it(kit, make_protocol, data, tmp_path):
    # The start permits live in the host-wide lock directory, beside the uid
    # leases: the first thing a task needs from it.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the uid locks should go")
    backend = FakeBackend(exits(0))
    ex = Executor(
        backend, policy=POLICY, run_dir=kit.run_dir, spool_dir=kit.spool_dir, uid_dir=blocker / "uids"
    )
    kit.executors.append(ex)
    with pytest.raises(HostError) as info:
        ex.run(_spec(make_protocol, data, "def run(ctx):\n    return 1\n"))
    message = str(info.value)
    assert message.startswith(f"cannot make the start permit directory {blocker / 'uids' / 'starting'}: ")
    assert "\n" not in message
    assert info.value.path == str(blocker / "uids" / "starting")
    assert backend.containers == {}


def test_a_run_directory_the_host_will_not_list_is_a_host_error_naming_it(
    kit, make_protocol, data, monkeypatch
):
    # As root (where these tests run) a mode cannot refuse the listing, so the
    # refusal a non-root parent meets on a 0o300 run directory is scripted.
    real_iterdir = Path.iterdir

    def refusing_iterdir(self: Path) -> Iterator[Path]:
        if self == kit.run_dir:
            raise PermissionError(13, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", refusing_iterdir)
    backend = FakeBackend(exits(0))
    ex = kit.executor(backend)
    with pytest.raises(HostError) as info:
        ex.run(_spec(make_protocol, data, "def run(ctx):\n    return 1\n"))
    assert str(info.value) == f"cannot list task directories in {kit.run_dir}: Permission denied"
    assert backend.containers == {}
    monkeypatch.undo()  # the fixture's own checks list the run directory


SENDERS = """
import threading


def run(ctx):
    errors = []

    def send():
        for _ in range(40):
            try:
                ctx.mailbox.send_training_update(b"x")
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors
"""


def test_a_protocol_sending_from_many_threads_at_once_is_never_refused_for_it(kit, make_protocol, data):
    # The parent allows 2 SendMessage calls open at once per task (beside the
    # mailbox stream); a third thread's send was refused, RESOURCE_EXHAUSTED,
    # and lost. The sandbox's client now waits for a slot instead.
    ex = kit.executor(FakeBackend(kit.runtime()))
    outcome = ex.run(_spec(make_protocol, data, SENDERS, task_id="t-senders"))
    assert outcome.status is Status.OK, outcome.error
    assert outcome.result == []
    assert ex.transport.discarded("t-senders").messages == 240
