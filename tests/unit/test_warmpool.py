"""Warm pools without Docker: the slot's session reference, making and destroying slots, the pool's refill.

The engine is :class:`~executor.testing.FakeBackend`; a warm container's
program plays the sandbox runtime's first step only: it reads the slot's
token, connects to the slot's socket and asks for its task over real gRPC.
Every test's pool gets private run and uid directories, and afterwards no
task directory, container or uid lease may remain.
"""

from __future__ import annotations

import functools
import itertools
import shutil
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from executor.backends import LABEL_WARM, ContainerSpec, ExitInfo
from executor.errors import CapacityError, ContainerError, HostError
from executor.policy import IsolationPolicy
from executor.rpc.session import SessionRef
from executor.sandbox.contract import START_SOCKET_NAME, TOKEN_METADATA_KEY
from executor.task import slot as warmslot
from executor.task import warmpool
from executor.task.launch import SANDBOX_IPC
from executor.task.lifeline import StartLine
from executor.task.taskdir import SOCKET_NAME, TOKEN_NAME
from executor.task.uids import UidPool
from executor.task.warmpool import Slot, WarmPool, make_slot
from executor.testing import FakeBackend, FakeContainer, Program
from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc
from tests.unit.conftest import wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.timeout(30)

POLICY = IsolationPolicy.hardened().replace(uid_start=30_101, uid_count=3, warm_pool=2, timeout_s=60)
RPC_TIMEOUT = 10


@pytest.fixture(autouse=True)
def fast_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """A waiting GetTask notices its call or its slot ended within 20 ms instead of 500 ms."""
    monkeypatch.setattr(SessionRef, "wait", functools.partialmethod(SessionRef.wait, poll_s=0.02))


# -- SessionRef ------------------------------------------------------------------------


class _Waiter:
    """``ref.wait`` in a thread of its own, as a server thread runs it for a waiting GetTask."""

    def __init__(self, ref: SessionRef, is_active: Callable[[], bool] = lambda: True) -> None:
        self.result: object = "not returned"
        self._thread = threading.Thread(target=self._run, args=(ref, is_active), daemon=True)
        self._thread.start()

    def _run(self, ref: SessionRef, is_active: Callable[[], bool]) -> None:
        self.result = ref.wait(is_active, poll_s=0.01)

    def join(self) -> object:
        self._thread.join(RPC_TIMEOUT)
        assert not self._thread.is_alive(), "wait() did not return"
        return self.result


def _held(waiter: _Waiter) -> bool:
    """Whether ``waiter``'s call is still held a moment after it began (either order of events passes)."""
    time.sleep(0.05)
    return waiter.result == "not returned"


def test_a_new_ref_has_no_session_and_holds_a_call_that_asks_for_it():
    ref = SessionRef(name="warm-x")
    assert ref.session is None
    waiter = _Waiter(ref)
    assert _held(waiter)
    ref.close()
    assert waiter.join() is None


def test_a_ref_made_with_a_session_is_bound_at_once(make_session):
    session = make_session().session
    ref = SessionRef(session)
    assert ref.session is session
    assert ref.name == session.task_id
    assert ref.wait(lambda: True, poll_s=0.01) is session
    with pytest.raises(RuntimeError):
        ref.bind(make_session(task_id="task-2").session)


def test_bind_hands_the_waiting_call_its_session(make_session):
    session = make_session(task_id="task-7").session
    ref = SessionRef(name="warm-x")
    waiter = _Waiter(ref)
    assert _held(waiter)
    ref.bind(session)
    assert waiter.join() is session
    assert ref.session is session
    assert ref.name == "task-7"
    assert ref.wait(lambda: True, poll_s=0.01) is session  # a later call gets it at once


def test_a_slot_serves_one_task_only(make_session):
    ref = SessionRef(name="warm-x")
    first = make_session(task_id="task-1").session
    ref.bind(first)
    with pytest.raises(RuntimeError, match="already has one"):
        ref.bind(make_session(task_id="task-2").session)
    assert ref.session is first


def test_a_closed_ref_takes_no_task(make_session):
    ref = SessionRef(name="warm-x")
    ref.close()
    with pytest.raises(RuntimeError, match="is closed"):
        ref.bind(make_session().session)
    assert ref.session is None


def test_close_releases_the_waiting_call_and_the_slot_takes_no_task(make_session):
    ref = SessionRef(name="warm-x")
    waiter = _Waiter(ref)
    assert _held(waiter)
    ref.close()
    assert waiter.join() is None
    with pytest.raises(RuntimeError, match="is closed"):
        ref.bind(make_session().session)


def test_a_call_that_ends_unanswered_releases_its_wait():
    ref = SessionRef(name="warm-x")
    active = threading.Event()
    active.set()
    waiter = _Waiter(ref, active.is_set)
    assert _held(waiter)
    active.clear()  # the sandbox hung up
    assert waiter.join() is None
    assert ref.session is None


def test_a_second_call_still_gets_the_task_after_the_first_ends(make_session):
    ref = SessionRef(name="warm-x")
    first_active = threading.Event()
    first_active.set()
    first = _Waiter(ref, first_active.is_set)
    second = _Waiter(ref)
    assert _held(first)
    assert _held(second)
    first_active.clear()
    assert first.join() is None
    # One call still waits: the sandbox is there, so the slot still takes its task.
    assert _held(second)
    session = make_session().session
    ref.bind(session)
    assert second.join() is session


# -- the engine and a warm sandbox that asks for its task ---------------------------------


@dataclass
class Sandboxes:
    """What the fake warm sandboxes received, by container id."""

    configs: dict[str, pb.TaskConfig] = field(default_factory=dict)
    errors: dict[str, grpc.StatusCode] = field(default_factory=dict)

    def program(self, *, give_up_after: float | None = None) -> Program:
        """Wait on the start line and then ask for the task, as the runtime does.

        With ``give_up_after``, die unanswered after that long.
        """

        def run(container: FakeContainer) -> ExitInfo | None:
            ipc = next(m.source for m in container.spec.mounts if m.target == SANDBOX_IPC)
            token = (ipc / TOKEN_NAME).read_text()
            start = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            go = b""
            try:
                start.connect(str(ipc / START_SOCKET_NAME))
                start.settimeout(give_up_after or RPC_TIMEOUT)
                go = start.recv(1)
            except OSError:
                pass
            finally:
                if go != b"\x01" and give_up_after is not None:
                    # Its last words before it hangs up, as the runtime's: the pool reads
                    # them once it sees the hang-up, which may be at once.
                    container.write("stderr", "runtime: gave up waiting\n")
                start.close()
            if go != b"\x01":
                self.errors[container.id] = grpc.StatusCode.UNAVAILABLE
                if give_up_after is not None:
                    return ExitInfo(1)
                container.wait_killed()
                return None
            with grpc.insecure_channel(f"unix:{ipc / SOCKET_NAME}") as channel:
                try:
                    config = pb_grpc.SandboxStub(channel).GetTask(
                        pb.GetTaskRequest(), metadata=((TOKEN_METADATA_KEY, token),), timeout=RPC_TIMEOUT
                    )
                except grpc.RpcError as exc:
                    self.errors[container.id] = exc.code()
                else:
                    self.configs[container.id] = config
            container.wait_killed()
            return None

        return run


@dataclass
class Host:
    """A test's private run and uid directories, and every pool and slot made on them."""

    run_dir: Path
    uid_dir: Path
    pools: list[WarmPool] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)

    def pool(self, backend: FakeBackend, policy: IsolationPolicy = POLICY) -> WarmPool:
        pool = WarmPool(
            backend, policy, run_dir=self.run_dir, uids=UidPool(self.uid_dir), instance_id="inst-1"
        )
        self.pools.append(pool)
        return pool

    def slot(self, backend: FakeBackend, policy: IsolationPolicy = POLICY) -> Slot:
        slot = make_slot(
            backend, policy, run_dir=self.run_dir, uids=UidPool(self.uid_dir), instance_id="inst-1"
        )
        self.slots.append(slot)
        return slot

    def leftovers(self) -> list[str]:
        return sorted(p.name for p in self.run_dir.iterdir()) if self.run_dir.exists() else []

    def uids_free(self, policy: IsolationPolicy = POLICY) -> bool:
        """Whether every uid of the policy's range can be leased: no slot still holds one."""
        pool = UidPool(self.uid_dir)
        leases = []
        try:
            for _ in policy.uid_range:
                leases.append(pool.lease(policy))
        except CapacityError:
            return False
        finally:
            for lease in leases:
                lease.release()
        return True


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    # Short: the slot's socket path must fit a sockaddr_un.
    run_dir = Path(tempfile.mkdtemp(prefix="se-", dir="/tmp"))
    host = Host(run_dir, tmp_path / "uids")
    try:
        yield host
    finally:
        for pool in host.pools:
            pool.close()
        for slot in host.slots:
            slot.discard()  # safe twice
        shutil.rmtree(run_dir, ignore_errors=True)


# -- make_slot and Slot --------------------------------------------------------------------


def test_a_slot_is_a_labelled_container_with_its_own_uid_and_empty_task_directories(host):
    backend = FakeBackend()
    slot = host.slot(backend)
    try:
        container = backend.only()
        assert container.running
        assert container.id == slot.container_id
        assert container.spec.labels[LABEL_WARM] == "true"
        assert slot.policy.uid in POLICY.uid_range
        assert container.spec.policy.uid == slot.policy.uid
        assert list(slot.task_dir.protocol.iterdir()) == list(slot.task_dir.data.iterdir()) == []
        assert slot.server.session is None
        assert not slot.ready
    finally:
        slot.discard()
    assert backend.all_removed()
    assert host.leftovers() == []
    assert host.uids_free()
    slot.discard()  # safe twice


@pytest.mark.parametrize("failing", ["create", "start"])
def test_a_slot_that_cannot_be_made_leaves_nothing_behind(host, failing):
    error = ContainerError("engine said no")
    backend = FakeBackend(**{f"{failing}_errors": [error]})
    with pytest.raises(ContainerError, match="engine said no"):
        host.slot(backend)
    assert host.leftovers() == []
    assert host.uids_free()
    assert backend.all_removed()  # a container created before start failed is removed
    assert len(backend.containers) == (1 if failing == "start" else 0)


def test_a_slot_whose_socket_cannot_be_bound_leaves_nothing_behind(host):
    # Failing before the slot exists: its directory is made, its server cannot listen.
    deep = host.run_dir / ("d" * 100)
    backend = FakeBackend()
    with pytest.raises(HostError, match="listen on"):
        make_slot(backend, POLICY, run_dir=deep, uids=UidPool(host.uid_dir), instance_id="inst-1")
    assert list(deep.iterdir()) == []
    assert host.uids_free()
    assert backend.calls == []


def test_a_slot_is_given_one_task_only(host, make_session):
    sandboxes = Sandboxes()
    backend = FakeBackend(program=sandboxes.program())
    slot = host.slot(backend)
    try:
        assert wait_for(lambda: slot.ready)
        kit = make_session(config=pb.TaskConfig(task_id="task-9", project_id="p"))
        slot.give(kit.session)
        with pytest.raises(RuntimeError, match="already used"):
            slot.give(make_session(task_id="task-10").session)
        assert wait_for(lambda: slot.container_id in sandboxes.configs)
        assert sandboxes.configs[slot.container_id].task_id == "task-9"
        assert slot.server.session is kit.session
    finally:
        slot.discard()
    with pytest.raises(RuntimeError, match="already used"):
        slot.give(make_session(task_id="task-11").session)
    assert backend.all_removed()
    assert host.leftovers() == []


def test_a_discarded_slot_cannot_be_given_a_task(host, make_session):
    slot = host.slot(FakeBackend())
    slot.discard()
    with pytest.raises(RuntimeError, match="already used"):
        slot.give(make_session().session)
    assert host.leftovers() == []


# -- WarmPool ------------------------------------------------------------------------------


def test_an_empty_or_closed_pool_gives_no_slot(host):
    backend = FakeBackend()
    assert host.pool(backend).take() is None  # never started: empty
    none = host.pool(backend, POLICY.replace(warm_pool=0))
    none.start()
    assert none.take() is None
    assert backend.calls == []
    pool = host.pool(backend)
    pool.close()
    pool.start()  # a closed pool does not start
    assert pool.take() is None
    assert backend.calls == []


def test_a_pool_fills_with_ready_slots_and_a_taken_slot_gets_its_task(host, make_session):
    sandboxes = Sandboxes()
    backend = FakeBackend(program=sandboxes.program())
    pool = host.pool(backend)
    pool.start()
    assert pool.wait_full(RPC_TIMEOUT)
    stats = pool.stats()
    assert (stats["ready"], stats["made"], stats["failed"]) == (2, 2, 0)
    assert len({s["uid"] for s in stats["slots"]}) == 2  # a uid each
    slot = pool.take()
    assert slot is not None
    assert slot.ready
    try:
        kit = make_session(config=pb.TaskConfig(task_id="task-3"))
        slot.give(kit.session)
        assert wait_for(lambda: slot.container_id in sandboxes.configs)
        assert sandboxes.configs[slot.container_id].task_id == "task-3"
        assert pool.stats()["taken"] == 1
    finally:
        slot.discard()
    assert wait_for(lambda: pool.stats()["made"] == 3)  # refilled
    pool.close()
    assert backend.all_removed()
    assert host.leftovers() == []
    assert host.uids_free()
    # The sandboxes still waiting were answered, not left hanging.
    assert set(sandboxes.errors.values()) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


class _TimedBackend(FakeBackend):
    """Records when each ``create`` was called."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.create_times: list[float] = []

    def create(self, spec: ContainerSpec) -> str:
        self.create_times.append(time.monotonic())
        return super().create(spec)


def test_failures_to_make_a_slot_back_off_are_counted_and_leave_nothing(host, monkeypatch):
    monkeypatch.setattr(warmpool, "RETRY_MIN_S", 0.02)
    backend = _TimedBackend(create_errors=[ContainerError("engine down")] * 3, program=Sandboxes().program())
    pool = host.pool(backend, POLICY.replace(warm_pool=1))
    pool.start()
    assert pool.wait_full(RPC_TIMEOUT)  # the fourth attempt succeeds
    stats = pool.stats()
    assert (stats["failed"], stats["made"]) == (3, 1)
    assert stats["last_error"] == "could not make a warm sandbox: engine down"
    gaps = [b - a for a, b in itertools.pairwise(backend.create_times)]
    assert len(gaps) == 3
    # Each retry waits longer: 0.02 s, then 0.04 s, then 0.08 s.
    assert gaps[0] >= 0.02, gaps
    assert gaps[1] >= 0.04, gaps
    assert gaps[2] >= 0.08, gaps
    assert len(host.leftovers()) == 1  # the one slot made; none of the failed ones
    pool.close()
    assert host.leftovers() == []
    assert host.uids_free()
    assert backend.all_removed()


@pytest.mark.parametrize("how", ["gave-up-waiting", "never-booted"])
def test_a_dead_slot_is_discarded_and_counted(host, monkeypatch, how):
    monkeypatch.setattr(warmpool, "CHECK_S", 0.02)
    monkeypatch.setattr(warmpool, "RETRY_MIN_S", 30.0)  # no second slot during the test
    if how == "never-booted":
        monkeypatch.setattr(warmslot, "BOOT_TIMEOUT_S", 0.1)
        program = None  # the fake container hangs and never asks for its task
    else:
        program = Sandboxes().program(give_up_after=0.05)
    backend = FakeBackend(program=program)
    pool = host.pool(backend, POLICY.replace(warm_pool=1))
    pool.start()
    assert wait_for(lambda: pool.stats()["failed"] == 1)
    # Counted first, then destroyed: container, server, directory, uid.
    assert wait_for(lambda: backend.all_removed() and host.leftovers() == [] and host.uids_free())
    stats = pool.stats()
    assert (stats["made"], stats["ready"], stats["booting"]) == (1, 0, 0)
    if how == "never-booted":
        assert stats["last_error"] == "a warm sandbox did not boot within 0.1 s"
    else:
        assert stats["last_error"] == "a warm sandbox stopped while it waited: runtime: gave up waiting"
    assert pool.take() is None
    pool.close()


def test_take_skips_a_slot_whose_sandbox_died_before_the_pool_looked(host, monkeypatch):
    monkeypatch.setattr(warmpool, "CHECK_S", 30.0)  # the refill thread does not look during the test
    sandboxes = Sandboxes()
    backend = FakeBackend(program=sandboxes.program(give_up_after=0.05))
    pool = host.pool(backend, POLICY.replace(warm_pool=1))
    pool.start()
    assert wait_for(lambda: pool.stats()["made"] == 1)
    (slot,) = pool._idle
    assert wait_for(lambda: slot.start.connected and not slot.start.waiting)
    assert pool.take() is None
    assert pool.stats()["taken"] == 0
    pool.close()
    assert backend.all_removed()
    assert host.leftovers() == []


class _BlockingStartBackend(FakeBackend):
    """An engine whose ``start`` blocks until the test releases it."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def start(self, container_id: str) -> None:
        self.entered.set()
        self.release.wait(RPC_TIMEOUT)
        super().start(container_id)


def test_close_while_a_slot_is_being_made_leaves_nothing_once_it_comes_back(host):
    backend = _BlockingStartBackend()
    pool = host.pool(backend, POLICY.replace(warm_pool=1))
    pool.start()
    closer: threading.Thread | None = None
    try:
        assert backend.entered.wait(RPC_TIMEOUT)
        closer = threading.Thread(target=pool.close, name="test-close")
        closer.start()
        closer.join(0.05)
        assert closer.is_alive()  # close waits for the engine call to come back
        assert len(host.leftovers()) == 1
    finally:
        backend.release.set()
        if closer is not None:
            closer.join(RPC_TIMEOUT)
    assert closer is not None
    assert not closer.is_alive()
    assert len(backend.containers) == 1
    assert backend.all_removed()
    assert host.leftovers() == []
    assert host.uids_free()
    assert pool.stats()["made"] == 0
    assert pool.take() is None


def test_the_start_line_hands_over_the_configuration_and_tells_a_waiting_runtime_from_a_dead_one(tmp_path):
    path = Path(tempfile.mkdtemp(prefix="se-start-", dir="/tmp")) / "start.sock"
    line = StartLine(path)
    line.start()
    runtime = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        config = pb.TaskConfig(task_id="t-1", parameters_json='{"x": 1}').SerializeToString()
        assert not line.waiting
        assert not line.go(config)
        runtime.connect(str(path))
        assert wait_for(lambda: line.waiting)
        assert not path.exists()  # one connection only: it stops listening
        assert line.go(config)
        runtime.settimeout(RPC_TIMEOUT)
        # GO, the length (4 bytes, big-endian), the configuration: what the runtime reads.
        got = runtime.recv(1 + 4 + len(config), socket.MSG_WAITALL)
        assert got == StartLine.GO + len(config).to_bytes(4, "big") + config
        runtime.close()
        assert wait_for(lambda: not line.waiting)  # it hung up
    finally:
        runtime.close()
        line.close()
        shutil.rmtree(path.parent, ignore_errors=True)
