"""The task's gRPC edge over a real Unix socket: authentication, validation, error mapping."""

from __future__ import annotations

import secrets
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from executor.service import METHOD_POLICY, TOKEN_METADATA_KEY, TaskServer, TokenAuthInterceptor
from executor.session import RequestRejected, TaskSession
from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc
from tests.unit.conftest import SessionKit, wait_for

pytestmark = pytest.mark.timeout(30)

CONFIG = pb.TaskConfig(
    task_id="task-1",
    project_id="proj-a",
    parameters_json='{"epochs": 3}',
    data_path="/data",
    max_result_bytes=64 * 1024,
)
RPC_TIMEOUT = 10


@dataclass
class Served:
    """A running task server and a client channel to it."""

    kit: SessionKit
    token: str
    stub: pb_grpc.SandboxStub
    socket_path: Path
    server: TaskServer
    channel: grpc.Channel

    @property
    def session(self) -> TaskSession:
        return self.kit.session

    @property
    def auth(self) -> tuple[tuple[str, str], ...]:
        return ((TOKEN_METADATA_KEY, self.token),)


@pytest.fixture
def served(make_session, request):
    """A TaskServer on a socket in a short private directory; torn down even on failure."""
    kit = make_session(
        config=CONFIG.SerializeToString(), max_result_bytes=64 * 1024, max_message_bytes=4 * 1024 * 1024
    )
    sock_dir = Path(tempfile.mkdtemp(prefix="se-unit-", dir="/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(sock_dir, ignore_errors=True))
    token = secrets.token_urlsafe(32)
    socket_path = sock_dir / "sandbox.sock"
    server = TaskServer(kit.session, token, socket_path)
    request.addfinalizer(lambda: server.stop(grace=0.2))
    server.start()
    channel = grpc.insecure_channel(f"unix:{socket_path}", options=[("grpc.enable_retries", 0)])
    request.addfinalizer(channel.close)
    return Served(kit, token, pb_grpc.SandboxStub(channel), socket_path, server, channel)


def _code(call, *args, **kwargs):
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if not isinstance(result, (pb.TaskConfig, pb.Ack)):  # a response stream: read it
            list(result)
    return info.value.code(), info.value.details()


# -- authentication ------------------------------------------------------------------


def test_call_without_token_is_unauthenticated(served):
    code, details = _code(served.stub.GetTask, pb.GetTaskRequest(), timeout=RPC_TIMEOUT)
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert served.session.config_fetched_at is None
    assert served.token not in details


@pytest.mark.parametrize(
    "make_metadata",
    [
        lambda token: ((TOKEN_METADATA_KEY, "wrong"),),
        lambda token: ((TOKEN_METADATA_KEY, ""),),
        lambda token: (("authorization", f"Bearer {token}"),),
        lambda token: ((TOKEN_METADATA_KEY, token + "x"),),
        lambda token: ((TOKEN_METADATA_KEY, token[:-1]),),
        lambda token: ((TOKEN_METADATA_KEY, token.upper()),),
    ],
    ids=["wrong", "empty", "other-header", "suffix", "prefix", "case"],
)
def test_wrong_token_is_unauthenticated(served, make_metadata):
    code, _ = _code(
        served.stub.Finish,
        pb.FinishRequest(status=pb.OK, result_json="1"),
        metadata=make_metadata(served.token),
        timeout=RPC_TIMEOUT,
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert served.session.finish is None


def test_unauthenticated_progress_never_reaches_the_listener(served):
    code, _ = _code(
        served.stub.ReportProgress,
        pb.ProgressEvent(kind=pb.ProgressEvent.RUN_START),
        metadata=((TOKEN_METADATA_KEY, "nope"),),
        timeout=RPC_TIMEOUT,
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED
    assert served.kit.progress == []


def test_heartbeat_with_wrong_token_is_unauthenticated(served):
    beats = iter([pb.Beat(seq=1, progress_events=1), pb.Beat(seq=2, progress_events=2)])
    responses = served.stub.Heartbeat(beats, metadata=((TOKEN_METADATA_KEY, "nope"),), timeout=RPC_TIMEOUT)
    with pytest.raises(grpc.RpcError) as info:
        next(responses)
    assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
    assert served.session.beat_stats.beats == 0


def _raw_call(channel, method, metadata):
    """Call ``method`` with an empty request of whatever type, whatever its streaming shape."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    kinds = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }
    multicallable = kinds[(method.client_streaming, method.server_streaming)](path)
    request = iter([b""]) if method.client_streaming else b""
    result = multicallable(request, metadata=metadata, timeout=RPC_TIMEOUT)
    if method.server_streaming:
        list(result)


def test_every_rpc_refuses_a_call_without_the_token(served):
    service = pb.DESCRIPTOR.services_by_name["Sandbox"]
    for metadata in ((), ((TOKEN_METADATA_KEY, "forged"),)):
        for method in service.methods:
            with pytest.raises(grpc.RpcError) as info:
                _raw_call(served.channel, method, metadata)
            assert info.value.code() in (
                grpc.StatusCode.UNAUTHENTICATED,
                grpc.StatusCode.PERMISSION_DENIED,
            ), method.name
    assert served.session.config_fetched_at is None
    assert served.session.finish is None
    assert served.session.beat_stats.beats == 0
    assert served.kit.progress == []


def test_right_token_gets_the_configuration(served):
    config = served.stub.GetTask(pb.GetTaskRequest(), metadata=served.auth, timeout=RPC_TIMEOUT)
    assert config == CONFIG
    assert served.session.config_fetched_at is not None


def test_method_policy_covers_exactly_the_service():
    service = pb.DESCRIPTOR.services_by_name["Sandbox"]
    methods = {f"/{service.full_name}/{m.name}" for m in service.methods}
    missing = sorted(methods - set(METHOD_POLICY))
    stale = sorted(set(METHOD_POLICY) - methods)
    assert not missing, f"RPCs with no entry in METHOD_POLICY (refused until decided): {missing}"
    assert not stale, f"METHOD_POLICY names RPCs the service lacks: {stale}"
    assert set(METHOD_POLICY.values()) == {"task-token"}


class _Aborted(Exception):
    pass


class _RecordingContext:
    code: grpc.StatusCode | None = None

    def abort(self, code, details):
        self.code, self.details = code, details
        raise _Aborted


@dataclass
class _Details:
    method: str
    invocation_metadata: tuple[tuple[str, str], ...]


def test_interceptor_fails_closed_for_unmapped_methods():
    calls: list[object] = []

    def behaviour(request, context):
        calls.append(request)
        return "served"

    interceptor = TokenAuthInterceptor("tok")
    real = grpc.unary_unary_rpc_method_handler(behaviour)

    def invoke(method, token):
        handler = interceptor.intercept_service(
            lambda d: real, _Details(method, ((TOKEN_METADATA_KEY, token),))
        )
        context = _RecordingContext()
        try:
            return handler.unary_unary("request", context)
        except _Aborted:
            return context.code

    assert invoke("/executor.v1.Sandbox/GetTask", "tok") == "served"
    assert calls == ["request"]
    assert invoke("/executor.v1.Sandbox/Debug", "tok") is grpc.StatusCode.PERMISSION_DENIED
    assert invoke("/other.Service/GetTask", "tok") is grpc.StatusCode.PERMISSION_DENIED
    assert invoke("/executor.v1.Sandbox/GetTask", "tok2") is grpc.StatusCode.UNAUTHENTICATED
    assert calls == ["request"]


# -- validation ------------------------------------------------------------------------


def test_receiving_a_send_only_type_is_invalid(served):
    code, details = _code(
        served.stub.ReceiveMessage,
        pb.ReceiveMessageRequest(type=pb.TRAINING_UPDATE, timeout_ms=10),
        metadata=served.auth,
        timeout=RPC_TIMEOUT,
    )
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert "TRAINING_UPDATE" in details


def test_out_of_range_enum_values_are_invalid(served):
    cases = [
        (served.stub.ReceiveMessage, pb.ReceiveMessageRequest(type=99, timeout_ms=10)),
        (served.stub.Finish, pb.FinishRequest(status=42, result_json="1")),
        (served.stub.ReportProgress, pb.ProgressEvent(kind=77)),
    ]
    for call, message in cases:
        code, _ = _code(call, message, metadata=served.auth, timeout=RPC_TIMEOUT)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, call
    assert served.session.finish is None
    assert served.kit.progress == []


def test_message_over_the_cap_is_refused_and_the_server_still_answers(served):
    huge = '"' + "x" * (2 * 1024 * 1024) + '"'
    code, _ = _code(
        served.stub.Finish,
        pb.FinishRequest(status=pb.OK, result_json=huge),
        metadata=served.auth,
        timeout=RPC_TIMEOUT,
    )
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert served.session.finish is None
    config = served.stub.GetTask(pb.GetTaskRequest(), metadata=served.auth, timeout=RPC_TIMEOUT)
    assert config.task_id == "task-1"


def test_send_and_receive_through_the_service(served):
    kit = served.kit
    body = bytes(range(256)) * 6000  # 1.5 MiB: more than one chunk
    kit.modeller.send(kit.task_id, "ALGORITHM_EXCHANGE", body)
    chunks = list(
        served.stub.ReceiveMessage(
            pb.ReceiveMessageRequest(type=pb.ALGORITHM_EXCHANGE, timeout_ms=2000),
            metadata=served.auth,
            timeout=RPC_TIMEOUT,
        )
    )
    assert len(chunks) > 1
    assert (chunks[0].type, chunks[0].total_size) == (pb.ALGORITHM_EXCHANGE, len(body))
    assert b"".join(c.data for c in chunks) == body

    update = b"delta" * 1000
    parts = [
        pb.MessageChunk(type=pb.TRAINING_UPDATE, total_size=len(update), data=update[:1000]),
        pb.MessageChunk(data=update[1000:]),
    ]
    served.stub.SendMessage(iter(parts), metadata=served.auth, timeout=RPC_TIMEOUT)
    got = kit.modeller.receive(kit.task_id, timeout=2)
    assert got is not None
    assert (got.type, got.read()) == ("TRAINING_UPDATE", update)


def test_receive_timeout_is_deadline_exceeded(served):
    code, _ = _code(
        served.stub.ReceiveMessage,
        pb.ReceiveMessageRequest(type=pb.MODELLER_RESPONSE, timeout_ms=50),
        metadata=served.auth,
        timeout=RPC_TIMEOUT,
    )
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED


# -- finish ------------------------------------------------------------------------------


def test_finish_is_recorded_once(served):
    request = pb.FinishRequest(status=pb.OK, result_json='{"mean": 21.0}')
    request.timings["run"] = 0.5
    served.stub.Finish(request, metadata=served.auth, timeout=RPC_TIMEOUT)
    report = served.session.finish
    assert report is not None
    assert (report.status, report.result, report.timings) == ("OK", {"mean": 21.0}, {"run": 0.5})
    code, _ = _code(
        served.stub.Finish,
        pb.FinishRequest(status=pb.ERROR, error=pb.ErrorInfo(type="Late", message="again")),
        metadata=served.auth,
        timeout=RPC_TIMEOUT,
    )
    assert code is grpc.StatusCode.FAILED_PRECONDITION
    assert served.session.finish is report


# -- heartbeat ---------------------------------------------------------------------------


def test_heartbeat_records_beats_and_delivers_controls(served):
    done = threading.Event()

    def beats():
        yield pb.Beat(seq=1, progress_events=0, mailbox_ops=0, main_thread_moved=True)
        yield pb.Beat(seq=2, progress_events=4, mailbox_ops=6, main_thread_moved=False)
        done.wait(RPC_TIMEOUT)

    responses = served.stub.Heartbeat(beats(), metadata=served.auth, timeout=RPC_TIMEOUT)
    try:
        assert wait_for(lambda: served.session.beat_stats.beats == 2)
        stats = served.session.beat_stats
        assert (stats.progress_events, stats.mailbox_ops, stats.main_thread_moved) == (4, 6, False)
        served.session.send_control("MODELLER_READY", "the modeller is up")
        control = next(responses)
        assert control.kind == pb.Control.MODELLER_READY
        assert control.reason == "the modeller is up"
    finally:
        done.set()
        responses.cancel()


def test_stop_ends_an_open_heartbeat_and_removes_the_socket(served):
    done = threading.Event()

    def beats():
        yield pb.Beat(seq=1)
        done.wait(RPC_TIMEOUT)

    responses = served.stub.Heartbeat(beats(), metadata=served.auth, timeout=RPC_TIMEOUT)
    try:
        assert wait_for(lambda: served.session.beat_stats.beats == 1)
        assert served.socket_path.exists()
        served.server.stop(grace=0.2)
        with pytest.raises((StopIteration, grpc.RpcError)):
            next(responses)
        assert not served.socket_path.exists()
    finally:
        done.set()
        responses.cancel()


# -- error mapping -----------------------------------------------------------------------


def test_unexpected_exception_becomes_internal_without_detail(served, monkeypatch):
    def broken():
        raise RuntimeError("secret detail: /etc/shadow")

    monkeypatch.setattr(served.session, "get_config", broken)
    with pytest.raises(grpc.RpcError) as info:
        served.stub.GetTask(pb.GetTaskRequest(), metadata=served.auth, timeout=RPC_TIMEOUT)
    assert info.value.code() is grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error"
    assert "shadow" not in (info.value.debug_error_string() or "")
    assert all("shadow" not in str(v) for _, v in info.value.trailing_metadata() or ())


def test_rejection_with_an_uncatalogued_code_becomes_internal(served, monkeypatch):
    def odd(update):
        raise RequestRejected("PERMISSION_DENIED", "leaky internals")

    monkeypatch.setattr(served.session, "report_progress", odd)
    with pytest.raises(grpc.RpcError) as info:
        served.stub.ReportProgress(
            pb.ProgressEvent(kind=pb.ProgressEvent.STEP), metadata=served.auth, timeout=RPC_TIMEOUT
        )
    assert info.value.code() is grpc.StatusCode.INTERNAL
    assert info.value.details() == "internal error"


def test_the_runtime_recognises_the_parents_rate_limit_refusal():
    from executor.sandbox.context import RATE_LIMITED
    from executor.service import CallLimiter

    limiter = CallLimiter(rate_per_s=0.001, burst=1)
    assert limiter.admit("/executor.v1.Sandbox/ReportProgress") is None
    assert limiter.admit("/executor.v1.Sandbox/ReportProgress") == RATE_LIMITED


def test_the_rpc_attack_suite_knows_the_real_rate_cap():
    import importlib.util
    from pathlib import Path

    from executor.service import RATE_BURST, RATE_PER_S

    path = Path(__file__).parents[1] / "protocols" / "rpc_attacks" / "protocol.py"
    spec = importlib.util.spec_from_file_location("rpc_attacks_protocol", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (module.RATE_PER_S, module.RATE_BURST) == (RATE_PER_S, RATE_BURST)
