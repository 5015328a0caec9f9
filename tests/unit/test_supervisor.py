"""The supervisor's verdicts against a fake engine: which limit applies when, and the numbers it reports."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from executor import supervisor as supervisor_module
from executor.backends import ContainerSpec, ExitInfo
from executor.outcome import ErrorDetail, Outcome, Status
from executor.policy import IsolationPolicy
from executor.session import TaskSession
from executor.supervisor import Supervisor

# Short limits keep each test well under a second; none asserts a duration.
FAST = IsolationPolicy.hardened().replace(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.3, timeout_s=5)


class FakeBackend:
    """A container that runs until killed or told how it exits; ``on_start`` plays the sandbox."""

    def __init__(self, on_start: Callable[[], None] | None = None, exit_info: ExitInfo | None = None) -> None:
        self.on_start = on_start
        self.exit_info = exit_info
        self.killed = threading.Event()
        self.removed: list[str] = []

    def check_image(self, image: str) -> None:
        pass

    def create(self, spec: ContainerSpec) -> str:
        return "c1"

    def start(self, container_id: str) -> None:
        if self.on_start is not None:
            self.on_start()

    def wait(self, container_id: str) -> ExitInfo:
        if self.exit_info is not None:
            return self.exit_info
        self.killed.wait(30)
        return ExitInfo(137)

    def kill(self, container_id: str) -> None:
        self.killed.set()

    def stderr_tail(self, container_id: str, lines: int) -> str:
        return "last words\n"

    def remove(self, container_id: str) -> None:
        self.removed.append(container_id)

    def list_managed(self) -> list[tuple[str, dict[str, str]]]:
        return []


def _supervise(session: TaskSession, backend: FakeBackend, policy: IsolationPolicy = FAST) -> Outcome:
    spec = ContainerSpec(name="sandbox-test", command=["true"], policy=policy, mounts=[])
    outcome = Supervisor(backend, spec, session, threading.Event()).run()
    assert backend.removed == ["c1"]
    return outcome


def _timeout_error(outcome: Outcome) -> ErrorDetail:
    assert outcome.status is Status.TIMEOUT, outcome.error
    assert outcome.error is not None
    return outcome.error


def test_a_silence_after_the_config_fetch_gets_the_heartbeat_limit_not_the_boot_grace(make_session):
    session = make_session().session
    # The sandbox fetches its configuration and then freezes before its first beat.
    error = _timeout_error(_supervise(session, FakeBackend(on_start=session.get_config)))
    assert error.type == "HeartbeatTimeout"
    assert error.limit_s == FAST.heartbeat_timeout_s
    assert error.measured_s is not None and error.measured_s > FAST.heartbeat_timeout_s


def test_before_the_config_fetch_the_boot_grace_applies(make_session, monkeypatch):
    monkeypatch.setattr(supervisor_module, "BOOT_GRACE_S", 0.5)
    session = make_session().session
    error = _timeout_error(_supervise(session, FakeBackend()))
    assert error.type == "HeartbeatTimeout"
    assert error.limit_s == 0.5
    assert error.measured_s is not None and error.measured_s > 0.5


def test_after_a_beat_the_heartbeat_limit_applies(make_session):
    session = make_session().session

    def boot_and_beat_once() -> None:
        session.get_config()
        session.record_beat(0, 0, True)

    error = _timeout_error(_supervise(session, FakeBackend(on_start=boot_and_beat_once)))
    assert error.type == "HeartbeatTimeout"
    assert error.limit_s == FAST.heartbeat_timeout_s


def test_the_wall_clock_limit_reports_its_limit_and_the_time_measured(make_session):
    session = make_session().session
    policy = FAST.replace(timeout_s=1)
    stop = threading.Event()

    def beat_on() -> None:
        session.get_config()
        while not stop.wait(0.02):
            session.record_beat(0, 0, True)

    beater = threading.Thread(target=beat_on, daemon=True)
    try:
        error = _timeout_error(_supervise(session, FakeBackend(on_start=beater.start), policy))
    finally:
        stop.set()
    assert error.type == "TimeoutError"
    assert error.limit_s == 1
    assert error.measured_s is not None and error.measured_s >= 1


def test_out_of_memory_reports_the_memory_limit_as_a_field(make_session):
    session = make_session().session
    policy = FAST.replace(memory_mb=192)
    outcome = _supervise(session, FakeBackend(exit_info=ExitInfo(137, oom_killed=True)), policy)
    assert outcome.status is Status.KILLED
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.memory_limit_mb) == ("OutOfMemory", 192)
    assert outcome.error.to_dict()["memory_limit_mb"] == 192


def test_the_first_beat_is_acknowledged_once(make_session):
    session = make_session().session
    for _ in range(3):
        session.record_beat(0, 0, False)
    controls = []
    while not session.controls.empty():
        controls.append(session.controls.get_nowait())
    assert controls == [("BEAT_SEEN", "")]


@pytest.mark.parametrize(
    ("detail", "added"),
    [
        (
            ErrorDetail("HeartbeatTimeout", "m", measured_s=1.52, limit_s=1.5),
            {"measured_s": 1.52, "limit_s": 1.5},
        ),
        (
            ErrorDetail("OutOfMemory", "m", exit_code=137, memory_limit_mb=128),
            {"exit_code": 137, "memory_limit_mb": 128},
        ),
        (ErrorDetail("Raised", "m"), {}),
    ],
)
def test_error_json_only_gains_the_numeric_keys_that_are_set(detail, added):
    assert detail.to_dict() == {"type": detail.type, "message": "m", **added}
