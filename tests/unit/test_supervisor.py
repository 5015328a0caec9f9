"""The supervisor's verdicts against a scripted engine: every status, the numbers it reports, and cleanup.

The real :class:`Supervisor` and :class:`TaskSession` run against
:class:`executor.testing.FakeBackend`; a program plays the sandbox by
calling the session as the servicer would. No Docker, no test asserts a
duration.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from typing import TYPE_CHECKING

import pytest

from executor.backends import ContainerSpec, ExitInfo, Scheduling
from executor.errors import ContainerError, EngineUnavailableError
from executor.events import Control, ControlKind
from executor.outcome import ErrorDetail, Outcome, Status
from executor.policy import IsolationPolicy
from executor.task import supervisor as supervisor_module
from executor.task.supervisor import Supervisor, abort_message
from executor.testing import (
    SIGKILL_EXIT,
    FakeBackend,
    FakeContainer,
    exits,
    hangs,
    killed_from_outside,
    lost,
    out_of_memory,
    then,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from executor.rpc.session import TaskSession
    from tests.unit.conftest import SessionKit

pytestmark = pytest.mark.timeout(60)

# Short limits keep each test well under a second; none asserts a duration.
FAST = IsolationPolicy.hardened().replace(heartbeat_interval_s=0.05, heartbeat_timeout_s=0.3, timeout_s=5)
# Liveness limits far beyond any test, for verdicts that must not be timeouts.
PATIENT = FAST.replace(heartbeat_timeout_s=30, timeout_s=60)


def _supervise(
    session: TaskSession,
    backend: FakeBackend,
    policy: IsolationPolicy = FAST,
    *,
    cancel: threading.Event | None = None,
    notify_abort: Callable[[str, str, str], None] | None = None,
) -> Outcome:
    spec = ContainerSpec(name="sandbox-test", command=["true"], policy=policy, mounts=[])
    outcome = Supervisor(backend, spec, session, threading.Event(), cancel, notify_abort).run()
    # Whatever the verdict, the container is gone.
    assert backend.containers, backend.calls
    assert backend.all_removed(), backend.calls
    return outcome


def _timeout_error(outcome: Outcome) -> ErrorDetail:
    assert outcome.status is Status.TIMEOUT, outcome.error
    assert outcome.error is not None
    return outcome.error


def _boot(session: TaskSession) -> Callable[[FakeContainer], None]:
    """A sandbox that fetches its configuration and beats once."""

    def boot(container: FakeContainer) -> None:
        session.get_config()
        session.record_beat(0, 0, True)

    return boot


def _reports(
    session: TaskSession,
    status: str,
    result_json: str = "",
    error_type: str = "",
    message: str = "",
    tb: str = "",
) -> Callable[[FakeContainer], None]:
    def report(container: FakeContainer) -> None:
        _boot(session)(container)
        session.report_finish(status, result_json, error_type, message, tb, {"run": 0.01})

    return report


# -- the sandbox reports ---------------------------------------------------------------


def test_a_result_is_ok_and_the_container_that_exits_by_itself_is_not_killed(make_session):
    session = make_session().session
    backend = FakeBackend(then(_reports(session, "OK", '{"mean": 21}'), exits(0)))
    outcome = _supervise(session, backend, PATIENT)
    assert outcome.status is Status.OK, outcome.error
    assert outcome.result == {"mean": 21}
    assert outcome.error is None
    assert outcome.timings["run"] == 0.01
    assert not backend.only().killed


def test_an_abort_is_abort_with_the_protocols_reason(make_session):
    session = make_session().session
    backend = FakeBackend(then(_reports(session, "ABORT", "", "NoData", "nothing to train on"), exits(0)))
    outcome = _supervise(session, backend, PATIENT)
    assert outcome.status is Status.ABORT
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.message) == ("NoData", "nothing to train on")


def test_an_exception_in_the_protocol_is_error_with_its_type_and_traceback(make_session):
    session = make_session().session
    tb = 'Traceback (most recent call last):\n  File "protocol.py", line 2\nValueError: bad\n'
    backend = FakeBackend(then(_reports(session, "ERROR", "", "ValueError", "bad", tb), exits(0)))
    outcome = _supervise(session, backend, PATIENT)
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.message, outcome.error.traceback) == ("ValueError", "bad", tb)
    assert outcome.result is None


def test_a_sandbox_that_reports_but_never_exits_is_killed_and_keeps_its_result(make_session, monkeypatch):
    monkeypatch.setattr(supervisor_module, "EXIT_GRACE_S", 0.2)
    session = make_session().session
    backend = FakeBackend(then(_reports(session, "OK", "7"), hangs()))
    outcome = _supervise(session, backend, PATIENT)
    assert (outcome.status, outcome.result) == (Status.OK, 7)
    assert backend.only().killed
    assert backend.ops(backend.only().id)[-2:] == ["kill", "remove"]


def test_a_task_ended_for_rpc_abuse_is_an_error_of_that_type(make_session):
    session = make_session().session

    def abuse(container: FakeContainer) -> None:
        _boot(session)(container)
        session.end_for_abuse("RpcAbuse", "the sandbox kept calling after 5000 refusals")

    # The parent closes its connections; the runtime then leaves (exit 75).
    outcome = _supervise(session, FakeBackend(then(abuse, exits(75))), PATIENT)
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert outcome.error.type == "RpcAbuse"


# -- the container ends without a result -------------------------------------------------


def test_an_exit_without_a_result_is_an_error_with_the_exit_code_and_stderr(make_session):
    session = make_session().session
    backend = FakeBackend(then(_boot(session), exits(3, stderr="Traceback\nSegfault in native code\n")))
    outcome = _supervise(session, backend, PATIENT)
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert outcome.error.type == "ContainerExited"
    assert outcome.error.exit_code == 3
    assert "Segfault in native code" in outcome.error.stderr_tail
    assert outcome.error.to_dict()["exit_code"] == 3


def test_only_the_last_lines_of_stderr_are_kept(make_session):
    session = make_session().session
    noise = "".join(f"line {i}\n" for i in range(500))
    outcome = _supervise(session, FakeBackend(exits(1, stderr=noise + "last words\n")), PATIENT)
    assert outcome.error is not None
    tail = outcome.error.stderr_tail.splitlines()
    assert tail[-1] == "last words"
    assert len(tail) == supervisor_module.STDERR_TAIL_LINES


def test_out_of_memory_is_killed_and_reports_the_memory_limit_as_a_field(make_session):
    session = make_session().session
    policy = PATIENT.replace(memory_mb=192)
    outcome = _supervise(session, FakeBackend(out_of_memory(stderr="MemoryError?\n")), policy)
    assert outcome.status is Status.KILLED
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.memory_limit_mb) == ("OutOfMemory", 192)
    assert outcome.error.exit_code == SIGKILL_EXIT
    assert outcome.error.to_dict()["memory_limit_mb"] == 192


def test_a_kill_from_outside_is_killed_not_out_of_memory(make_session):
    session = make_session().session
    outcome = _supervise(session, FakeBackend(then(_boot(session), killed_from_outside())), PATIENT)
    assert outcome.status is Status.KILLED
    assert outcome.error is not None
    assert outcome.error.type == "Killed"
    assert outcome.error.exit_code == SIGKILL_EXIT
    assert outcome.error.memory_limit_mb is None


def test_a_lost_container_is_an_error_and_is_still_removed(make_session):
    session = make_session().session
    backend = FakeBackend(then(_boot(session), lost("no such container")))
    outcome = _supervise(session, backend, PATIENT)
    assert outcome.status is Status.ERROR
    assert outcome.error is not None
    assert outcome.error.type == "ContainerLost"
    assert "remove" in backend.ops(backend.only().id)


# -- liveness --------------------------------------------------------------------------


def test_a_silence_after_the_config_fetch_gets_the_heartbeat_limit_not_the_boot_grace(make_session):
    session = make_session().session
    # The sandbox fetches its configuration and then freezes before its first beat.
    backend = FakeBackend(then(lambda c: session.get_config(), hangs()))
    error = _timeout_error(_supervise(session, backend))
    assert error.type == "HeartbeatTimeout"
    assert error.limit_s == FAST.heartbeat_timeout_s
    assert error.measured_s is not None
    assert error.measured_s > FAST.heartbeat_timeout_s
    assert backend.only().killed


def test_before_the_config_fetch_the_boot_grace_applies(make_session, monkeypatch):
    monkeypatch.setattr(supervisor_module, "BOOT_GRACE_S", 0.5)
    session = make_session().session
    error = _timeout_error(_supervise(session, FakeBackend(hangs())))
    assert error.type == "HeartbeatTimeout"
    assert error.limit_s == 0.5
    assert error.measured_s is not None
    assert error.measured_s > 0.5


def test_after_a_beat_the_heartbeat_limit_applies(make_session):
    session = make_session().session
    error = _timeout_error(_supervise(session, FakeBackend(then(_boot(session), hangs()))))
    assert error.type == "HeartbeatTimeout"
    assert error.limit_s == FAST.heartbeat_timeout_s


def _beating(session: TaskSession, moved: bool, progress: bool) -> Callable[[FakeContainer], None]:
    """A sandbox that beats until killed, its main thread and counters moving or not."""

    def beat_on(container: FakeContainer) -> None:
        session.get_config()
        n = 0
        while not container.wait_killed(0.02):
            n += progress
            session.record_beat(n, 0, moved)

    return beat_on


def test_beats_without_progress_are_a_stall(make_session):
    session = make_session().session
    policy = FAST.replace(stall_timeout_s=0.3, heartbeat_timeout_s=5, timeout_s=5)
    error = _timeout_error(
        _supervise(session, FakeBackend(_beating(session, moved=False, progress=False)), policy)
    )
    assert error.type == "StallTimeout"
    assert error.limit_s == 0.3
    assert error.measured_s is not None
    assert error.measured_s > 0.3


@pytest.mark.parametrize(
    ("moved", "progress"), [(True, False), (False, True)], ids=["main-thread", "counters"]
)
def test_beats_with_progress_are_not_a_stall(make_session, moved, progress):
    session = make_session().session
    policy = FAST.replace(stall_timeout_s=0.3, heartbeat_timeout_s=5, timeout_s=1)
    error = _timeout_error(_supervise(session, FakeBackend(_beating(session, moved, progress)), policy))
    assert error.type == "TimeoutError"  # the wall clock, not a stall


def test_the_wall_clock_limit_reports_its_limit_and_the_time_measured(make_session):
    session = make_session().session
    policy = FAST.replace(timeout_s=1)
    error = _timeout_error(
        _supervise(session, FakeBackend(_beating(session, moved=True, progress=False)), policy)
    )
    assert error.type == "TimeoutError"
    assert error.limit_s == 1
    assert error.measured_s is not None
    assert error.measured_s >= 1


def _notifier(kit: SessionKit) -> Callable[[str, str, str], None]:
    """The notice as :class:`~executor.runner.Executor` wires it: through the task's broker, once."""

    def notify(reason: str, kind: str, message: str) -> None:
        kit.broker.send_abort(abort_message(reason, kind, message))

    return notify


def _modeller_abort(kit: SessionKit) -> dict[str, str]:
    message = kit.modeller.receive(kit.task_id, 5)
    assert message is not None, "the modeller was not told"
    assert message.type == "TASK_ABORT"
    body: dict[str, str] = json.loads(message.read())
    return body


@pytest.mark.parametrize("limit", ["heartbeat", "stall", "wall-clock"])
def test_a_timeout_tells_the_modeller_the_task_aborted_for_exceeding_limits(make_session, limit):
    kit = make_session()
    session = kit.session
    if limit == "heartbeat":
        policy, program, expected = FAST, then(_boot(session), hangs()), "HeartbeatTimeout"
    elif limit == "stall":
        policy = FAST.replace(stall_timeout_s=0.3, heartbeat_timeout_s=5, timeout_s=5)
        program, expected = _beating(session, moved=False, progress=False), "StallTimeout"
    else:
        policy = FAST.replace(timeout_s=1)
        program, expected = _beating(session, moved=True, progress=False), "TimeoutError"

    error = _timeout_error(_supervise(session, FakeBackend(program), policy, notify_abort=_notifier(kit)))
    assert error.type == expected
    body = _modeller_abort(kit)
    assert (body["reason"], body["exception_type"]) == ("LimitsExceeded", expected)


def test_a_failing_modeller_notice_does_not_change_the_verdict(make_session):
    session = make_session().session

    def notify(reason: str, kind: str, message: str) -> None:
        raise EngineUnavailableError("the message service is down")

    error = _timeout_error(
        _supervise(session, FakeBackend(then(_boot(session), hangs())), notify_abort=notify)
    )
    assert error.type == "HeartbeatTimeout"


def _cancelled(session: TaskSession, cancel: threading.Event) -> Callable[[FakeContainer], None]:
    def obey(container: FakeContainer) -> None:
        _boot(session)(container)
        cancel.set()
        assert _controls_until(session, ControlKind.CANCEL, container)

    return then(obey, exits(130))


@pytest.mark.parametrize(
    ("ending", "status", "reason", "exception_type"),
    [
        ("error", Status.ERROR, "ProtocolError", "ValueError"),
        ("abort", Status.ABORT, "Aborted", "NoData"),
        ("cancel", Status.CANCELLED, "Cancelled", "Cancelled"),
        ("oom", Status.KILLED, "OutOfMemory", "OutOfMemory"),
        ("kill", Status.KILLED, "Killed", "Killed"),
        ("exit", Status.ERROR, "ContainerExited", "ContainerExited"),
        ("lost", Status.ERROR, "ContainerLost", "ContainerLost"),
    ],
)
def test_every_ending_without_ok_tells_the_modeller_why(make_session, ending, status, reason, exception_type):
    kit = make_session()
    session = kit.session
    cancel = threading.Event()
    program = {
        "error": lambda: then(_reports(session, "ERROR", "", "ValueError", "bad"), exits(0)),
        "abort": lambda: then(_reports(session, "ABORT", "", "NoData", "nothing to train on"), exits(0)),
        "cancel": lambda: _cancelled(session, cancel),
        "oom": lambda: then(_boot(session), out_of_memory()),
        "kill": lambda: then(_boot(session), killed_from_outside()),
        "exit": lambda: then(_boot(session), exits(3)),
        "lost": lambda: then(_boot(session), lost("no such container")),
    }[ending]()
    outcome = _supervise(session, FakeBackend(program), PATIENT, cancel=cancel, notify_abort=_notifier(kit))
    assert outcome.status is status, outcome.error
    assert outcome.error is not None
    body = _modeller_abort(kit)
    assert (body["reason"], body["exception_type"]) == (reason, exception_type)
    assert body["message"] == outcome.error.message
    assert kit.modeller.receive(kit.task_id, 0.2) is None, "the modeller was told twice"


def test_an_ok_task_sends_no_abort(make_session):
    kit = make_session()
    backend = FakeBackend(then(_reports(kit.session, "OK", "1"), exits(0)))
    outcome = _supervise(kit.session, backend, PATIENT, notify_abort=_notifier(kit))
    assert outcome.status is Status.OK
    assert kit.modeller.receive(kit.task_id, 0.2) is None


def test_a_protocol_that_sent_its_own_abort_is_not_contradicted(make_session):
    kit = make_session()
    session = kit.session
    own = json.dumps({"message": "the cohort is too small", "reason": "TooFewRows"}).encode()

    def abort_politely(container: FakeContainer) -> None:
        _boot(session)(container)
        session.send_message("TASK_ABORT", len(own), iter([own]))
        session.report_finish("ABORT", "", "TooFewRows", "the cohort is too small", "", {})

    outcome = _supervise(
        session, FakeBackend(then(abort_politely, exits(0))), PATIENT, notify_abort=_notifier(kit)
    )
    assert outcome.status is Status.ABORT
    assert _modeller_abort(kit)["reason"] == "TooFewRows"
    assert kit.modeller.receive(kit.task_id, 0.2) is None, "the parent sent a second TASK_ABORT"


# -- cancel ----------------------------------------------------------------------------


def _controls_until(session: TaskSession, kind: ControlKind, container: FakeContainer) -> bool:
    """Read controls as the heartbeat stream would, until ``kind`` comes (or the container is killed)."""
    while not container.wait_killed(0):
        try:
            item = session.controls.get(timeout=0.05)
        except queue.Empty:
            continue
        if item is not None and item.kind is kind:
            return True
    return False


def test_a_cancel_the_sandbox_obeys_is_cancelled_without_a_kill(make_session):
    session = make_session().session
    cancel = threading.Event()

    def obey(container: FakeContainer) -> None:
        _boot(session)(container)
        cancel.set()
        assert _controls_until(session, ControlKind.CANCEL, container)

    backend = FakeBackend(then(obey, exits(130)))
    outcome = _supervise(session, backend, PATIENT, cancel=cancel)
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert outcome.error.type == "Cancelled"
    assert not backend.only().killed, "a sandbox that stopped within the grace was killed"


def test_a_cancel_the_sandbox_ignores_ends_in_a_kill(make_session, monkeypatch):
    monkeypatch.setattr(supervisor_module, "CANCEL_GRACE_S", 0.2)
    session = make_session().session
    cancel = threading.Event()

    def ignore(container: FakeContainer) -> None:
        _boot(session)(container)
        cancel.set()
        container.wait_killed()

    backend = FakeBackend(ignore)
    outcome = _supervise(session, backend, PATIENT, cancel=cancel)
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert (outcome.error.type, outcome.error.limit_s) == ("Cancelled", 0.2)
    assert backend.only().killed


def test_a_sandbox_that_reports_after_a_cancel_is_cancelled_not_error(make_session):
    session = make_session().session
    cancel = threading.Event()

    def stop_and_report(container: FakeContainer) -> None:
        _boot(session)(container)
        cancel.set()
        session.report_finish("ERROR", "", "Cancelled", "the task was cancelled", "", {})

    outcome = _supervise(session, FakeBackend(then(stop_and_report, exits(0))), PATIENT, cancel=cancel)
    assert outcome.status is Status.CANCELLED
    assert outcome.error is not None
    assert outcome.error.type == "Cancelled"


# -- the engine ------------------------------------------------------------------------


def test_an_engine_refusing_the_create_raises_and_leaves_nothing_to_remove(make_session):
    session = make_session().session
    backend = FakeBackend(create_errors=[ContainerError("container create failed: 500 Server Error")])
    spec = ContainerSpec(name="sandbox-test", command=["true"], policy=PATIENT, mounts=[])
    with pytest.raises(ContainerError):
        Supervisor(backend, spec, session, threading.Event()).run()
    assert backend.containers == {}
    assert [op for op, _ in backend.calls] == ["create"]


def test_an_engine_refusing_the_start_raises_and_the_created_container_is_removed(make_session):
    session = make_session().session
    backend = FakeBackend(start_errors=[ContainerError("container start failed: 500 Server Error")])
    spec = ContainerSpec(name="sandbox-test", command=["true"], policy=PATIENT, mounts=[])
    with pytest.raises(ContainerError):
        Supervisor(backend, spec, session, threading.Event()).run()
    assert backend.all_removed()
    assert backend.ops(backend.only().id) == ["start", "remove"]


# -- plumbing --------------------------------------------------------------------------


def test_the_first_beat_is_acknowledged_once(make_session):
    session = make_session().session
    for _ in range(3):
        session.record_beat(0, 0, False)
    controls = []
    while not session.controls.empty():
        controls.append(session.controls.get_nowait())
    assert controls == [Control(ControlKind.BEAT_SEEN)]


def test_the_boot_phase_is_timed_once_the_config_is_fetched(make_session):
    session = make_session().session
    outcome = _supervise(session, FakeBackend(then(_reports(session, "OK", "1"), exits(0))), PATIENT)
    assert {"create", "start", "boot", "run"} <= set(outcome.timings)


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


# -- slow is not frozen: the sandbox's CPU time, read from outside ----------------------


def _cpu_clock(share: float) -> Callable[[], float]:
    """CPU time that advances with the clock at ``share`` of a core, whatever the test's threads do."""
    t0 = time.monotonic()
    return lambda: share * (time.monotonic() - t0)


def _burning(share: float) -> Callable[[FakeContainer], None]:
    """A silent sandbox whose cgroup CPU time advances (a boot on a busy host) until killed."""

    def burn(container: FakeContainer) -> None:
        container.cpu_s = _cpu_clock(share)
        container.wait_killed()

    return burn


def _silent_until(session: TaskSession, after_s: float, *, share: float) -> Callable[[FakeContainer], None]:
    """Silent (but using CPU) for ``after_s``, then it boots, beats and reports OK."""

    def slow_boot(container: FakeContainer) -> None:
        container.cpu_s = _cpu_clock(share)
        if container.wait_killed(after_s):
            return
        _reports(session, "OK", "1")(container)

    return slow_boot


def _read_since(container: FakeContainer, reads: int, timeout: float = 30.0) -> None:
    """Block until the supervisor has read the container's usage again (after ``reads`` reads)."""
    end = time.monotonic() + timeout
    while container.usage_reads <= reads and time.monotonic() < end:
        time.sleep(0.01)


def test_a_boot_slower_than_the_grace_that_uses_cpu_is_not_judged_frozen(make_session, monkeypatch):
    monkeypatch.setattr(supervisor_module, "BOOT_GRACE_S", 0.3)
    session = make_session().session
    backend = FakeBackend(then(_silent_until(session, 1.2, share=0.5), exits(0)))
    outcome = _supervise(session, backend, FAST)
    assert outcome.status is Status.OK, outcome.error
    assert not backend.only().killed


def test_a_silent_sandbox_whose_cpu_stands_still_is_frozen(make_session, monkeypatch):
    monkeypatch.setattr(supervisor_module, "BOOT_GRACE_S", 0.3)
    session = make_session().session

    def idle(container: FakeContainer) -> None:
        container.cpu_s = 0.5  # what it used before it froze
        container.wait_killed()

    error = _timeout_error(_supervise(session, FakeBackend(idle), FAST))
    assert error.type == "HeartbeatTimeout"
    assert error.limit_s == 0.3


def _starved_until(session: TaskSession, after_s: float, **standing: int) -> Callable[[FakeContainer], None]:
    """Silent, its CPU time still, its threads waiting on the host (``active`` or run-queue wait)."""

    def starved(container: FakeContainer) -> None:
        container.cpu_s = 0.01
        t0 = time.monotonic()
        active = standing.get("active", 0)
        # Waiting for a CPU the whole time (one thread), unless only ``active`` is set.
        share = 0.0 if active else 1.0
        container.scheduling = lambda: Scheduling(
            waited_s=share * (time.monotonic() - t0), active=active, threads=3
        )
        if container.wait_killed(after_s):
            return
        _reports(session, "OK", "1")(container)

    return starved


@pytest.mark.parametrize(
    "standing", [{"active": 0}, {"active": 1}], ids=["runnable-starved", "in-kernel-wait"]
)
def test_a_boot_starved_of_cpu_or_blocked_in_the_kernel_is_slow_not_frozen(
    make_session, monkeypatch, standing
):
    # Its CPU time stands still, but its threads want the host (a host busier
    # than its cores, or storage that is starved too): no hang verdict.
    monkeypatch.setattr(supervisor_module, "BOOT_GRACE_S", 0.3)
    session = make_session().session
    backend = FakeBackend(then(_starved_until(session, 1.5, **standing), exits(0)))
    outcome = _supervise(session, backend, FAST)
    assert outcome.status is Status.OK, outcome.error
    assert not backend.only().killed


def test_a_still_sandbox_whose_threads_all_sleep_is_frozen(make_session, monkeypatch):
    monkeypatch.setattr(supervisor_module, "BOOT_GRACE_S", 0.3)
    session = make_session().session

    def asleep(container: FakeContainer) -> None:
        container.cpu_s = 0.5
        container.scheduling = Scheduling(waited_s=2.0, active=0, threads=4)  # no wait added, none active
        container.wait_killed()

    error = _timeout_error(_supervise(session, FakeBackend(asleep), FAST))
    assert error.type == "HeartbeatTimeout"


def test_a_frozen_sandbox_after_its_boot_is_caught_though_it_used_cpu_before(make_session):
    session = make_session().session

    def works_then_freezes(container: FakeContainer) -> None:
        container.cpu_s = 0.0
        _boot(session)(container)
        for _ in range(10):  # beats while busy, then a SIGSTOP: neither beats nor CPU
            container.cpu_s += 0.05
            session.record_beat(0, 0, True)
            time.sleep(0.02)
        container.wait_killed()

    error = _timeout_error(_supervise(session, FakeBackend(works_then_freezes), FAST))
    assert error.type == "HeartbeatTimeout"


def test_a_boot_that_uses_cpu_forever_ends_at_the_boot_limit(make_session, monkeypatch):
    monkeypatch.setattr(supervisor_module, "BOOT_GRACE_S", 0.2)
    monkeypatch.setattr(supervisor_module, "BOOT_LIMIT_S", 0.8)
    session = make_session().session
    error = _timeout_error(_supervise(session, FakeBackend(_burning(0.5)), FAST))
    assert error.type == "BootTimeout"
    assert error.limit_s == 0.8
    assert error.measured_s is not None
    assert error.measured_s > 0.8


def test_the_wall_clock_starts_at_the_first_beat_not_at_the_boot(make_session):
    session = make_session().session
    # A boot (silent, busy) longer than the whole wall-clock limit, then a run well within it.
    policy = PATIENT.replace(timeout_s=1)
    backend = FakeBackend(then(_silent_until(session, 1.5, share=0.5), exits(0)))
    outcome = _supervise(session, backend, policy)
    assert outcome.status is Status.OK, outcome.error


def test_a_cpu_time_limit_ends_a_busy_sandbox_as_cpu_time_exceeded(make_session):
    session = make_session().session
    policy = PATIENT.replace(cpu_time_s=0.5)

    def busy_after_boot(container: FakeContainer) -> None:
        container.cpu_s = 3.0  # the boot's CPU is not the protocol's
        _boot(session)(container)
        while not container.wait_killed(0.02):
            container.cpu_s += 0.04
            session.record_beat(0, 0, True)

    backend = FakeBackend(busy_after_boot)
    error = _timeout_error(_supervise(session, backend, policy))
    assert error.type == "CpuTimeExceeded"
    assert error.limit_s == 0.5
    assert error.measured_s is not None
    assert 0.5 < error.measured_s < 3.0
    assert backend.only().killed


def test_a_silent_sandbox_the_oom_killer_hit_is_out_of_memory_not_frozen(make_session):
    session = make_session().session

    def oom_then_hang(container: FakeContainer) -> None:
        container.cpu_s, container.oom_kills = 0.0, 0
        _boot(session)(container)
        time.sleep(0.05)
        container.oom_kills = 1  # gVisor: part of the sandbox killed, the rest hangs
        container.wait_killed()

    outcome = _supervise(session, FakeBackend(oom_then_hang), FAST)
    assert outcome.status is Status.KILLED
    assert outcome.error is not None
    assert outcome.error.type == "OutOfMemory"
    assert outcome.error.memory_limit_mb == FAST.memory_mb


def test_an_exit_after_an_oom_kill_the_engine_did_not_flag_is_out_of_memory(make_session):
    session = make_session().session

    def child_oom_then_exit(container: FakeContainer) -> ExitInfo:
        container.cpu_s, container.oom_kills = 0.0, 0
        _boot(session)(container)
        reads = container.usage_reads
        container.oom_kills = 1
        _read_since(container, reads)  # the supervisor read the cgroup before the container is gone
        return ExitInfo(2)

    outcome = _supervise(session, FakeBackend(child_oom_then_exit), PATIENT)
    assert outcome.status is Status.KILLED
    assert outcome.error is not None
    assert outcome.error.type == "OutOfMemory"
    assert outcome.error.exit_code == 2


def test_without_usage_figures_the_heartbeat_rule_alone_decides(make_session):
    session = make_session().session
    backend = FakeBackend(then(_boot(session), hangs()), measures=False)
    error = _timeout_error(_supervise(session, backend))
    assert error.type == "HeartbeatTimeout"


def test_the_start_permit_is_given_back_at_the_first_beat_while_the_task_runs(make_session, tmp_path):
    from executor.task.admission import StartGate

    session = make_session().session
    gate = StartGate(1, tmp_path)
    permit = gate.acquire()
    assert permit is not None
    seen: list[bool] = []

    def runs(container: FakeContainer) -> None:
        _boot(session)(container)
        # The sandbox runs on; the next one in line may start meanwhile.
        seen.append(wait_for_release(permit))
        session.report_finish("OK", "1", "", "", "", {})

    spec = ContainerSpec(name="sandbox-test", command=["true"], policy=PATIENT, mounts=[])
    outcome = Supervisor(
        FakeBackend(then(runs, exits(0))), spec, session, threading.Event(), permit=permit
    ).run()
    assert outcome.status is Status.OK
    assert seen == [True]
    assert gate.starting == 0


def wait_for_release(permit: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while getattr(permit, "held", False):
        if time.monotonic() > end:
            return False
        time.sleep(0.01)
    return True


def test_an_adopted_slot_that_ends_before_its_first_beat_fails_the_hand_over_not_the_task(make_session):
    from executor.task.supervisor import HandOverFailed

    session = make_session().session
    backend = FakeBackend(hangs())
    cid = backend.create(ContainerSpec(name="warm", command=["true"], policy=FAST, mounts=[]))
    backend.start(cid)
    spec = ContainerSpec(name="warm", command=["true"], policy=FAST, mounts=[])

    def give() -> float:
        session.get_config()
        backend.containers[cid].end(ExitInfo(1))  # it died as it was handed the task
        return time.monotonic()

    sup = Supervisor(backend, spec, session, threading.Event(), adopt=cid, give=give)
    with pytest.raises(HandOverFailed):
        sup.run()
    assert backend.containers[cid].removed


def test_an_adopted_slot_that_never_beats_fails_the_hand_over(make_session):
    from executor.task.supervisor import HandOverFailed

    session = make_session().session
    backend = FakeBackend(hangs())
    cid = backend.create(ContainerSpec(name="warm", command=["true"], policy=FAST, mounts=[]))
    backend.start(cid)
    spec = ContainerSpec(name="warm", command=["true"], policy=FAST, mounts=[])

    def give() -> float:
        session.get_config()
        return time.monotonic()

    with pytest.raises(HandOverFailed):
        Supervisor(backend, spec, session, threading.Event(), adopt=cid, give=give).run()
    assert backend.containers[cid].killed
    assert backend.containers[cid].removed
