"""What a protocol's ctx does against a real task server in this process: mailbox, shares, progress, files.

The sandbox's :class:`Context` talks over a real Unix socket to a real
:class:`TaskServer`, whose session forwards to a real
:class:`MailboxBroker` and an in-memory modeller. No container: what is
tested is the contract between the two sides, not the isolation.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from executor.events import ControlKind
from executor.mailbox import broker as mailbox_module
from executor.mailbox.broker import MailboxBroker
from executor.mailbox.crypto import TaskKeys
from executor.mailbox.transport import Route
from executor.rpc.server import TaskServer
from executor.rpc.session import TaskSession
from executor.sandbox import progress as progress_module
from executor.sandbox import runtime
from executor.sandbox.client import ParentClient
from executor.sandbox.context import (
    Context,
    MailboxError,
    MailboxTimeout,
    ReportRefused,
    SandboxError,
    TaskAborted,
)
from executor.sandbox.contract import (
    BULK_MIN_BYTES,
    BULK_SOCKET_NAME,
    PROGRESS_STEP_INTERVAL_S,
    TOKEN_METADATA_KEY,
)
from executor.testing import InMemoryTransport, chunked
from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc
from tests.unit.conftest import SessionKit, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.timeout(60)

MIB = 1024 * 1024


def _config(**kwargs: Any) -> pb.TaskConfig:
    fields: dict[str, Any] = {
        "task_id": "task-1",
        "project_id": "proj",
        "parameters_json": '{"epochs": 2}',
        "schema_json": "{}",
        "data_path": "/data",
        "chunk_bytes": 1024,
        "max_message_bytes": 8 * MIB,
        "max_result_bytes": 1024,
        "heartbeat_interval_ms": 50,
    }
    fields.update(kwargs)
    return pb.TaskConfig(**fields)


@dataclass
class Connected:
    """A served session and a protocol's context on it."""

    session: TaskSession
    server: TaskServer
    ctx: Context
    client: ParentClient


@pytest.fixture
def connect(tmp_path: Path) -> Iterator[Callable[..., Connected]]:
    """Serve a session on a fresh socket and build a ``Context`` connected to it; all closed after."""
    cleanups: list[Callable[[], None]] = []

    def make(
        session: TaskSession, config: pb.TaskConfig | None = None, *, bulk: bool = False, **server_kwargs: Any
    ) -> Connected:
        sock_dir = Path(tempfile.mkdtemp(prefix="se-ctx-", dir="/tmp"))
        cleanups.append(lambda: shutil.rmtree(sock_dir, ignore_errors=True))
        token = secrets.token_urlsafe(32)
        server = TaskServer(session, token, sock_dir / "s.sock", **server_kwargs)
        server.start()
        cleanups.append(lambda: server.stop(grace=0.2))
        channel = grpc.insecure_channel(f"unix:{sock_dir / 's.sock'}", options=[("grpc.enable_retries", 0)])
        cleanups.append(channel.close)
        client = ParentClient(
            pb_grpc.SandboxStub(channel),
            ((TOKEN_METADATA_KEY, token),),
            str(sock_dir / BULK_SOCKET_NAME) if bulk else None,
        )
        ctx = Context(config or _config(), client, tmp_path / "scratch")
        return Connected(session, server, ctx, client)

    yield make
    for cleanup in reversed(cleanups):
        cleanup()


@pytest.fixture
def kit(make_session: Callable[..., SessionKit]) -> SessionKit:
    return make_session(max_message_bytes=8 * MIB, max_task_bytes=64 * MIB)


# -- the task ------------------------------------------------------------------------------


def test_the_context_carries_the_configuration(kit, connect, tmp_path):
    config = _config(
        modeller_name="modeller-1", pod_identifier="pod-a", flags=pb.Flags(test_run=True), secrets={"K": "v"}
    )
    ctx = connect(kit.session, config).ctx
    assert (ctx.task_id, ctx.project_id, ctx.modeller_name, ctx.pod_identifier) == (
        "task-1",
        "proj",
        "modeller-1",
        "pod-a",
    )
    assert ctx.parameters == {"epochs": 2}
    assert ctx.flags.test_run
    assert not ctx.flags.batched_execution
    assert ctx.secrets == {"K": "v"}
    assert ctx.scratch_dir == tmp_path / "scratch"


# -- mailbox -------------------------------------------------------------------------------


def test_a_body_larger_than_a_chunk_reaches_the_modeller_whole(kit, connect):
    c = connect(kit.session)
    body = os.urandom(5000)  # five chunks of the configured 1 KiB
    c.ctx.mailbox.send_training_update(body)
    message = kit.modeller.receive(kit.task_id, 5)
    assert message is not None
    assert (message.type, message.read()) == ("TRAINING_UPDATE", body)
    assert c.client.mailbox_ops == 1


def test_a_body_above_the_spool_threshold_travels_through_files_both_ways(kit, connect):
    c = connect(kit.session, _config(chunk_bytes=MIB))
    size = mailbox_module.SPOOL_THRESHOLD + 12345
    up = os.urandom(size)
    c.ctx.mailbox.send_training_update(up)
    message = kit.modeller.receive(kit.task_id, 10)
    assert message is not None, "the large body never reached the modeller"
    assert message.path is not None, "a large body should reach the modeller as a file"
    assert message.read() == up
    down = os.urandom(size)
    kit.modeller.send_stream(kit.task_id, "ALGORITHM_EXCHANGE", chunked(down))
    assert c.ctx.mailbox.await_algorithm_exchange(timeout=10) == down
    # The opened copy was spooled, and is gone once streamed.
    spool = kit.broker._spool
    assert wait_for(lambda: [p.name for p in spool.iterdir()] == [mailbox_module.SPOOL_OWNER]), list(
        spool.iterdir()
    )


def test_large_bodies_take_the_bulk_socket_both_ways_and_small_ones_do_not(kit, connect, monkeypatch):
    c = connect(kit.session, _config(chunk_bytes=MIB), bulk=True)
    connections = []
    real = ParentClient.bulk_connect
    monkeypatch.setattr(ParentClient, "bulk_connect", lambda self, t: connections.append(t) or real(self, t))
    up = os.urandom(BULK_MIN_BYTES + 12345)
    c.ctx.mailbox.send_training_update(up)
    message = kit.modeller.receive(kit.task_id, 10)
    assert message is not None
    assert message.read() == up
    down = os.urandom(3 * MIB + 7)
    kit.modeller.send_stream(kit.task_id, "ALGORITHM_EXCHANGE", chunked(down))
    assert c.ctx.mailbox.await_algorithm_exchange(timeout=10) == down
    assert len(connections) == 2
    assert len(set(connections)) == 2  # a ticket each
    small = os.urandom(BULK_MIN_BYTES - 1)
    c.ctx.mailbox.send_training_update(small)
    message = kit.modeller.receive(kit.task_id, 10)
    assert message is not None
    assert message.read() == small
    assert len(connections) == 2
    assert c.client.mailbox_ops == 3


def test_a_mailbox_operation_while_another_waits_is_not_held_up_by_it(kit, connect):
    # One thread waits in a receive (holding the mailbox stream); another
    # thread's send still goes through at once, by a call of its own.
    c = connect(kit.session)
    got: list[bytes] = []
    waiter = threading.Thread(target=lambda: got.append(c.ctx.mailbox.await_modeller_response(timeout=10)))
    waiter.start()
    try:
        assert wait_for(lambda: kit.session._pending_receives == 1)
        c.ctx.mailbox.send_training_update(b"while waiting")
        message = kit.modeller.receive(kit.task_id, 5)
        assert message is not None
        assert message.read() == b"while waiting"
        assert waiter.is_alive()
    finally:
        kit.modeller.send(kit.task_id, "MODELLER_RESPONSE", b"reply")
        waiter.join(10)
    assert got == [b"reply"]


def test_the_seed_mailbox_helpers_send_what_the_modeller_expects(kit, connect):
    mailbox = connect(kit.session).ctx.mailbox
    mailbox.send_task_start()
    mailbox.send_number_of_batches(3)
    mailbox.send_current_batch_id(2)
    mailbox.send_batches_complete("done")
    mailbox.send_task_abort("stopping", reason="NoData", exception_type="ValueError")
    got = [kit.modeller.receive(kit.task_id, 5) for _ in range(5)]
    assert [m.type for m in got if m is not None] == [
        "TASK_START",
        "NUMBER_OF_BATCHES",
        "CURRENT_BATCH_ID",
        "BATCHES_COMPLETE",
        "TASK_ABORT",
    ]
    assert got[1] is not None
    assert got[1].read() == b'{"number_of_batches": 3}'
    assert got[4] is not None
    assert b'"reason": "NoData"' in got[4].read()


def test_every_await_helper_receives_its_own_type(kit, connect):
    mailbox = connect(kit.session).ctx.mailbox
    for kind, wait in [
        ("MODELLER_RESPONSE", mailbox.await_modeller_response),
        ("TASK_COMPLETE", mailbox.await_task_complete),
        ("TRAINING_COMPLETE", mailbox.await_training_complete),
    ]:
        kit.modeller.send(kit.task_id, kind, kind.encode())
        assert wait(timeout=5) == kind.encode()


def test_a_receive_with_nothing_sent_is_a_mailbox_timeout(kit, connect):
    with pytest.raises(MailboxTimeout) as info:
        connect(kit.session).ctx.mailbox.await_modeller_response(timeout=0.2)
    assert isinstance(info.value, TimeoutError)
    assert info.value.code == "DEADLINE_EXCEEDED"


def test_types_the_sandbox_may_not_use_are_refused(kit, connect):
    mailbox = connect(kit.session).ctx.mailbox
    with pytest.raises(MailboxError) as info:
        mailbox.receive("TASK_START", timeout=1)  # only the parent watches for the modeller's TASK_START
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(MailboxError) as info:
        mailbox.send("MODELLER_RESPONSE", b"forged")
    assert info.value.code == "INVALID_ARGUMENT"
    with pytest.raises(ValueError, match="unknown message type 'NOT_A_TYPE'"):
        mailbox.send("NOT_A_TYPE", b"")
    assert kit.modeller.receive(kit.task_id, 0.1) is None


def test_a_body_over_the_limit_is_refused_before_any_call(kit, connect):
    c = connect(kit.session, _config(max_message_bytes=100))
    calls: list[object] = []
    c.session.send_message = lambda *a: calls.append(a)  # type: ignore[method-assign]
    with pytest.raises(MailboxError) as info:
        c.ctx.mailbox.send_training_update(b"x" * 101)
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert calls == []


def test_wait_for_modeller_returns_once_the_modeller_is_ready(kit, connect, monkeypatch):
    exits: list[int] = []
    monkeypatch.setattr(runtime.os, "_exit", exits.append)
    c = connect(kit.session)
    kit.broker.watch_ready(lambda: kit.session.send_control(ControlKind.MODELLER_READY))
    heartbeat = runtime.Heartbeat(c.client, 0.05)
    ctx = Context(_config(), c.client, c.ctx.scratch_dir, modeller_ready=heartbeat.modeller_ready)
    heartbeat.start()
    try:
        assert heartbeat.wait_seen(5)
        assert not ctx.mailbox.wait_for_modeller(0.2)
        kit.modeller.ready(kit.task_id)
        assert ctx.mailbox.wait_for_modeller(5)
    finally:
        heartbeat.stop()
    assert exits == []


# -- secure shares -------------------------------------------------------------------------


def test_shares_go_from_one_pods_sandbox_to_its_peers(connect, tmp_path):
    transport = InMemoryTransport(spool_dir=tmp_path / "transport")
    pods = ("pod-a", "pod-b")
    private = {p: rsa.generate_private_key(public_exponent=65537, key_size=2048) for p in pods}
    aes = os.urandom(32)
    contexts: dict[str, Context] = {}
    brokers: list[MailboxBroker] = []
    try:
        for pod in pods:
            peers = tuple(p for p in pods if p != pod)
            route = Route("task-s", pod, peers=peers)
            keys = TaskKeys(aes, private[pod], {p: private[p].public_key() for p in peers})
            broker = MailboxBroker(
                route,
                transport.open(route),
                keys,
                tmp_path / f"spool-{pod}",
                max_message_bytes=MIB,
                max_task_bytes=MIB,
            )
            brokers.append(broker)
            session = TaskSession("task-s", b"", broker, max_result_bytes=1024)
            contexts[pod] = connect(session, _config(task_id="task-s", pod_identifier=pod)).ctx
        contexts["pod-a"].mailbox.send_secure_shares({"pod-b": b"share for b"})
        contexts["pod-b"].mailbox.send_secure_shares({"pod-a": b"share for a"})
        assert contexts["pod-b"].mailbox.get_secure_shares(timeout=5) == {"pod-a": b"share for b"}
        assert contexts["pod-a"].mailbox.get_secure_shares(timeout=5) == {"pod-b": b"share for a"}
        with pytest.raises(MailboxTimeout):
            contexts["pod-a"].mailbox.get_secure_shares(timeout=0.2)
        with pytest.raises(MailboxError) as info:
            contexts["pod-a"].mailbox.send_secure_shares({"pod-z": b"not a peer"})
        assert info.value.code == "RESOURCE_EXHAUSTED"
    finally:
        for broker in brokers:
            broker.close()
        transport.close()


# -- progress, files, abort ----------------------------------------------------------------


def test_progress_events_reach_the_parent_with_their_fields(kit, connect):
    c = connect(kit.session)
    progress = c.ctx.progress
    progress.run_start()
    progress.epoch_start(1, 3)
    progress.step(2, 10, info="batch 2", epoch=1, max_epochs=3)
    progress.epoch_end(1, 3)
    progress.run_end()
    assert [u.kind for u in kit.progress] == ["RUN_START", "EPOCH_START", "STEP", "EPOCH_END", "RUN_END"]
    step = kit.progress[2]
    assert (step.current, step.total, step.info, step.current_epoch, step.max_epochs) == (
        2,
        10,
        "batch 2",
        1,
        3,
    )
    assert (kit.progress[1].current_epoch, kit.progress[1].max_epochs) == (1, 3)
    assert c.client.progress_events == 5


def test_a_report_of_any_kind_travels_by_its_case_and_is_checked_as_that_kind(kit, connect):
    c = connect(kit.session)
    c.ctx.report("progress", kind=pb.ProgressEvent.STEP, current=4, total=8, info="generic")
    assert [(u.kind, u.current, u.total, u.info) for u in kit.progress] == [("STEP", 4, 8, "generic")]
    # The parent checks it as it checks that kind's own method.
    with pytest.raises(ReportRefused) as refused:
        c.ctx.report("progress", kind=pb.ProgressEvent.STEP, info="i" * 2000)
    assert refused.value.code == "INVALID_ARGUMENT"
    # A kind the contract does not have, or a field its message lacks, sends nothing.
    for kind, fields in (("telemetry", {}), ("progress", {"colour": "red"}), ("progress", {"current": "x"})):
        with pytest.raises(ReportRefused) as local:
            c.ctx.report(kind, **fields)
        assert local.value.code == ""
    assert len(kit.progress) == 1


@pytest.fixture
def datasource(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    (data / "scans").mkdir(parents=True)
    (data / "a.csv").write_text("1\n")
    (data / "scans" / "b.csv").write_text("2\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.csv").write_text("s\n")
    (data / "link.csv").symlink_to(outside / "secret.csv")
    (data / "linked").symlink_to(outside)
    (data / "inner-link.csv").symlink_to(data / "a.csv")
    return data


def test_file_outcomes_with_good_names_are_recorded(make_session, connect, datasource):
    kit = make_session(data_dir=datasource)
    ctx = connect(kit.session).ctx
    ctx.file_processed("a.csv")
    ctx.file_failed("scans/b.csv", "unreadable")
    assert kit.session.file_outcomes() == {
        "a.csv": ("PROCESSED", ""),
        "scans/b.csv": ("FAILED", "unreadable"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "/etc/passwd",
        "../outside/secret.csv",
        "scans/../a.csv",
        "./a.csv",
        "scans//b.csv",
        "a.csv\0.png",
        "",
        "link.csv",
        "linked/secret.csv",
        "inner-link.csv",
        "scans",
        "missing.csv",
        "scans/missing.csv",
    ],
    ids=[
        "absolute",
        "dotdot",
        "inner-dotdot",
        "dot",
        "double-slash",
        "nul",
        "empty",
        "symlink-out",
        "symlinked-dir",
        "symlink-in",
        "directory",
        "missing",
        "missing-nested",
    ],
)
def test_file_names_outside_a_plain_regular_file_of_the_datasource_are_refused(
    make_session, connect, datasource, name
):
    kit = make_session(data_dir=datasource)
    ctx = connect(kit.session).ctx
    with pytest.raises(ValueError, match="refused"):
        ctx.file_processed(name)
    with pytest.raises(ValueError, match="refused"):
        ctx.file_failed(name, "why")
    assert kit.session.file_outcomes() == {}


def test_abort_ends_the_protocol_with_its_reason(kit, connect):
    ctx = connect(kit.session).ctx
    with pytest.raises(TaskAborted) as info:
        ctx.abort("no usable data", reason="NoData")
    assert (str(info.value), info.value.reason) == ("no usable data", "NoData")


# -- what protocol code may catch ----------------------------------------------------------


def test_a_refused_file_outcome_is_a_report_refused_with_the_parents_code(make_session, connect, datasource):
    kit = make_session(data_dir=datasource)
    ctx = connect(kit.session).ctx
    with pytest.raises(ReportRefused) as info:
        ctx.file_processed("../outside/secret.csv")
    assert info.value.code == "INVALID_ARGUMENT"
    assert "secret.csv" in str(info.value)
    # One root for protocol code, and still the ValueError it used to be.
    assert isinstance(info.value, SandboxError)
    assert isinstance(info.value, ValueError)


CTX_CALLS: dict[str, tuple[Callable[[Context], object], type[SandboxError]]] = {
    "progress": (lambda ctx: ctx.progress.step(1, 2, "half"), ReportRefused),
    "run_start": (lambda ctx: ctx.progress.run_start(), ReportRefused),
    "file_processed": (lambda ctx: ctx.file_processed("a.csv"), ReportRefused),
    "file_failed": (lambda ctx: ctx.file_failed("a.csv", "bad"), ReportRefused),
    "send": (lambda ctx: ctx.mailbox.send_training_update(b"w" * 3000), MailboxError),
    "send_task_abort": (lambda ctx: ctx.mailbox.send_task_abort("stop"), MailboxError),
    "receive": (lambda ctx: ctx.mailbox.await_algorithm_exchange(timeout=2), MailboxError),
    "send_shares": (lambda ctx: ctx.mailbox.send_secure_shares({"pod-b": b"s"}), MailboxError),
    "get_shares": (lambda ctx: ctx.mailbox.get_secure_shares(timeout=2), MailboxError),
}


@pytest.mark.parametrize("call", sorted(CTX_CALLS))
def test_no_grpc_error_reaches_protocol_code_when_the_parent_is_gone(kit, connect, call):
    c = connect(kit.session)
    c.server.stop(grace=0)
    action, expected = CTX_CALLS[call]
    with pytest.raises(SandboxError) as info:
        action(c.ctx)
    assert type(info.value) is expected, info.value
    assert not isinstance(info.value, grpc.RpcError)
    assert info.value.code == "UNAVAILABLE"
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__


# -- the parent's rate cap -----------------------------------------------------------------


def test_a_protocol_over_the_rate_cap_is_slowed_not_failed(kit, connect):
    c = connect(kit.session, rate_per_s=50.0, burst=5)
    refused = []
    limiter = c.server._limiter
    real_take = limiter.take

    def counting_take() -> str | None:
        reason = real_take()
        if reason is not None:
            refused.append(reason)
        return reason

    limiter.take = counting_take  # type: ignore[method-assign]
    for i in range(30):
        c.ctx.progress.epoch_start(i, 30)  # boundaries are never coalesced
    assert len(kit.progress) == 30, "every event arrives"
    assert refused, "the cap was never reached: this test shows nothing"


def test_progress_reports_have_a_budget_of_their_own_and_an_eager_sender_is_slowed_not_failed(
    kit, connect, monkeypatch
):
    # Finding 4 of the third red team: progress calls took the whole call
    # budget (about 1000/s, half a core of the parent). Each report is now
    # also charged to a progress bucket; one the bucket refuses carries the
    # rate-limit signal, so the child (or an older child that does not
    # coalesce steps, as here) retries it after a pause.
    from executor.rpc import limits

    monkeypatch.setattr(limits, "PROGRESS_PER_S", 100.0)
    monkeypatch.setattr(limits, "PROGRESS_BURST", 5)
    c = connect(kit.session)
    refused = []
    limiter = c.server._limiter
    real = limiter.progress

    def counting() -> str | None:
        reason = real()
        if reason is not None:
            refused.append(reason)
        return reason

    limiter.progress = counting  # type: ignore[method-assign]
    for i in range(20):
        c.ctx.progress._report("STEP", current=i)  # one call each, as an older child sent every step
    assert [u.current for u in kit.progress] == list(range(20)), "every report arrives, in order"
    assert refused
    assert set(refused) == {limits.PROGRESS_RATE_LIMITED}
    assert c.client.rate_limited == len(refused)


def test_steps_in_a_tight_loop_cost_a_few_calls_and_the_last_one_arrives_before_the_next_boundary(
    kit, connect
):
    c = connect(kit.session)
    progress = c.ctx.progress
    progress.epoch_start(1, 1)
    for i in range(2000):
        progress.step(i, 2000, info=f"loss {i}")
    progress.epoch_end(1, 1)
    kinds = [u.kind for u in kit.progress]
    assert kinds[0] == "EPOCH_START"
    assert kinds[-1] == "EPOCH_END"
    steps = [u.current for u in kit.progress if u.kind == "STEP"]
    assert steps[0] == 0
    assert steps[-1] == 1999
    assert steps == sorted(steps)
    assert len(steps) < 100, f"{len(steps)} of 2000 steps were sent: they were not coalesced"
    assert c.client.progress_events == 2002  # yet every step counted as activity in the beats


class StillClock:
    """The sandbox context's clock (its ``time``): standing still until the test moves it; sleeps are real."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    @staticmethod
    def sleep(seconds: float) -> None:
        time.sleep(seconds)


def test_a_step_left_waiting_is_sent_by_itself_when_its_interval_is_up(kit, connect, monkeypatch):
    # The steps come within one interval whatever the machine's load (on real time, a
    # first step's call slower than the interval let the second through at once).
    clock = StillClock()
    monkeypatch.setattr(progress_module, "time", clock)
    c = connect(kit.session)
    for i in range(10):
        c.ctx.progress.step(i, 10)
    assert wait_for(lambda: len(kit.progress) == 1)
    clock.now += PROGRESS_STEP_INTERVAL_S  # the flusher looks again within an interval of real time
    assert wait_for(lambda: [u.current for u in kit.progress] == [0, 9])


def test_a_step_whose_info_is_not_text_is_refused_in_the_sandbox(kit, connect):
    c = connect(kit.session)
    with pytest.raises(ReportRefused) as info:
        c.ctx.progress.step(1, 2, "\ud800")
    assert info.value.code == ""
    assert kit.progress == []


def test_other_resource_exhausted_refusals_are_not_retried(make_session, connect):
    kit = make_session(max_message_bytes=MIB, max_task_bytes=100)
    c = connect(kit.session)
    calls = []
    real_send = kit.session.send_message

    def counting_send(*args: Any) -> None:
        calls.append(args[0])
        real_send(*args)

    kit.session.send_message = counting_send  # type: ignore[method-assign]
    with pytest.raises(MailboxError) as info:
        c.ctx.mailbox.send_training_update(b"x" * 200)  # past the task's quota, not its rate
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert calls == ["TRAINING_UPDATE"]
