"""Watch one running container until its task ends, and say how it ended.

The supervisor is the only place that decides an outcome. It wakes on the
sandbox's result, the container's exit or a cancel request, and between those
checks the wall-clock limit, the heartbeat's age (a frozen sandbox stops
beating) and, when the project asks for it, progress (a sandbox that beats but
does nothing is stuck). Whatever ends the task, the container is killed if
still running and removed.

Every task that ends without OK tells the modeller so with a TASK_ABORT, whose
``reason`` says how it ended and whose ``exception_type`` is the outcome's
error type:

==============================  ==========  ==============================
how the task ended              status      reason
==============================  ==========  ==============================
wall clock, heartbeat, stall    TIMEOUT     ``LimitsExceeded``
the protocol raised             ERROR       ``ProtocolError``
the protocol aborted            ABORT       ``Aborted``
the operator cancelled it       CANCELLED   ``Cancelled``
out of memory                   KILLED      ``OutOfMemory``
killed from outside             KILLED      ``Killed``
exited without a result         ERROR       ``ContainerExited``
the engine lost the container   ERROR       ``ContainerLost``
a batch could not be recorded   ERROR       ``NotRecorded``
==============================  ==========  ==============================

A protocol that has already sent its own TASK_ABORT (``ctx.mailbox.
send_task_abort``) is not contradicted: the notice is sent at most once per
task (:meth:`~executor.mailbox.broker.MailboxBroker.send_abort`).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from executor.errors import BackendError, SandboxExecutorError
from executor.events import ControlKind, FinishReport
from executor.outcome import ErrorDetail, Outcome, Status
from executor.task.usage import UsageWatch, busy, confirm_s, moving

if TYPE_CHECKING:
    from collections.abc import Callable

    from executor.backends import ContainerBackend, ContainerSpec, ExitInfo, Scheduling
    from executor.policy import IsolationPolicy
    from executor.rpc.session import TaskSession
    from executor.task.admission import Permit

log = logging.getLogger(__name__)

# After a result arrives the runtime exits by itself; this long at most.
EXIT_GRACE_S = 10.0
# After a cancel request the protocol has this long to stop before a kill.
CANCEL_GRACE_S = 5.0
STDERR_TAIL_LINES = 20
# Before it fetches its configuration a sandbox may be silent this long (or
# the heartbeat timeout, if longer): booting (interpreter, imports, slower
# under gVisor) is not hanging. From the fetch on the heartbeat timeout
# applies, and the runtime starts no protocol code before its first beat has
# been seen, so no protocol code ever runs under this grace.
BOOT_GRACE_S = 30.0
# However busy the host, a sandbox must boot (from its start to its first beat)
# within this long: past it the task ends as BootTimeout even if the boot
# still uses CPU. The protocol's wall clock starts only at the first beat.
BOOT_LIMIT_S = 300.0
# Exit statuses of a process killed by SIGKILL, as engines report them.
_SIGKILL_CODES = (137, -9)


# The TASK_ABORT reasons the parent sends (see the module docstring).
REASON_LIMITS = "LimitsExceeded"
REASON_PROTOCOL_ERROR = "ProtocolError"
REASON_ABORTED = "Aborted"
REASON_CANCELLED = "Cancelled"


class HandOverFailed(Exception):
    """A warm slot died or hung before its task's first beat: no protocol code ran in it.

    Never an outcome: the task starts again in another slot or cold
    (:mod:`executor.task.batch`), since nothing of it ran.
    """


@dataclass
class _Verdict:
    status: Status
    error: ErrorDetail
    reason: str


@dataclass
class Supervisor:
    """Supervises one task's container.

    Args:
        backend: The engine.
        spec: The container to create.
        session: The task's RPC-side state.
        wake: Set by anything the supervisor should react to at once.
        cancel: Set by the caller to cancel the task.
        notify_abort: Sends the modeller a TASK_ABORT (reason, error type,
            message) when a task ends without OK.
        on_start: Called with the container's id once it has started (e.g. to
            follow its output); an exception from it is logged, never raised.
        adopt: The id of a container already running, a warm slot just given
            this task (:mod:`executor.task.warmpool`): it is watched under the same
            rules, instead of a new one being created.
        give: Hands the adopted slot its task, first thing (following its
            output and awaiting its exit come right after); returns when
            (``time.monotonic()``) it did, or raises :class:`HandOverFailed`.
            The boot's limits run from then.
        permit: The start permit the task holds (:mod:`executor.task.admission`),
            given back once the sandbox's first beat is seen or it ends.
    """

    backend: ContainerBackend
    spec: ContainerSpec
    session: TaskSession
    wake: threading.Event
    cancel: threading.Event | None = None
    notify_abort: Callable[[str, str, str], object] | None = None
    on_start: Callable[[str], object] | None = None
    adopt: str | None = None
    give: Callable[[], float] | None = None
    permit: Permit | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def policy(self) -> IsolationPolicy:
        """The task's isolation policy."""
        return self.spec.policy

    def run(self) -> Outcome:
        """Create, start (or adopt) and watch the container; always remove it.

        Raises:
            HandOverFailed: The adopted warm slot died or hung before the
                task's first beat (no protocol code ran); it is removed.
        """
        task_id = self.session.task_id
        container_id: str | None = self.adopt
        try:
            if container_id is None:
                t = time.monotonic()
                container_id = self.backend.create(self.spec)
                self.timings["create"] = time.monotonic() - t
                t = time.monotonic()
                self.backend.start(container_id)
                running_since = time.monotonic()
                self.timings["start"] = running_since - t
            if self.adopt is not None:
                # A warm slot: its boot happened before the task existed; the
                # boot's limits start when it is given the task.
                running_since = self.give() if self.give is not None else time.monotonic()
            if self.on_start is not None:
                try:
                    self.on_start(container_id)
                except Exception:
                    log.exception("task %s: the start listener failed", task_id)
            exit_box = self._await_exit(container_id)
            outcome, reason = self._watch(container_id, running_since, exit_box)
            if outcome.status is not Status.OK and outcome.error is not None:
                self._abort_modeller(reason, outcome.error)
            return outcome
        finally:
            if self.permit is not None:
                self.permit.release()
            if container_id is not None:
                try:
                    self.backend.remove(container_id)
                except BackendError as exc:
                    log.warning("could not remove container %s of task %s: %s", container_id, task_id, exc)

    def _await_exit(self, cid: str) -> list[ExitInfo | BaseException]:
        """A box that gets how the container ended (or why that is unknown), filled by a thread."""
        exit_box: list[ExitInfo | BaseException] = []

        def await_exit() -> None:
            try:
                exit_box.append(self.backend.wait(cid))
            except BaseException as exc:  # reported below as a lost container
                exit_box.append(exc)
            self.wake.set()

        threading.Thread(target=await_exit, name=f"wait-{self.session.task_id[:8]}", daemon=True).start()
        return exit_box

    def _watch(
        self, cid: str, running_since: float, exit_box: list[ExitInfo | BaseException]
    ) -> tuple[Outcome, str]:
        """The task's outcome, and the reason to give the modeller if it is not OK."""
        policy = self.policy
        session = self.session
        tick = min(policy.heartbeat_interval_s / 4, 0.25)
        usage = UsageWatch(self.backend, cid, max(policy.heartbeat_timeout_s, BOOT_GRACE_S))
        usage.sample(time.monotonic(), force=True)
        cpu_at_start: float | None = None
        self._slow_noted = False
        self._cid, self._tick = cid, tick
        self._suspect: tuple[float, Scheduling | None, float] | None = None
        self._starved = False
        verdict: _Verdict | None = None
        while not session.finished.is_set() and not exit_box:
            now = time.monotonic()
            usage.sample(now)
            first_beat = session.beat_stats.first_beat
            if first_beat is not None:
                if self.permit is not None and self.permit.held:
                    self.permit.release()  # booted: the next sandbox in line may start
                if cpu_at_start is None:
                    cpu_at_start = usage.cpu_s if usage.cpu_s is not None else -1.0
            if self.cancel is not None and self.cancel.is_set():
                verdict = self._cancel(cid, exit_box)
            elif first_beat is not None and now >= first_beat + policy.timeout_s:
                verdict = _Verdict(
                    Status.TIMEOUT,
                    ErrorDetail(
                        "TimeoutError",
                        f"the task exceeded its wall-clock limit of {policy.timeout_s:g} s",
                        measured_s=now - first_beat,
                        limit_s=policy.timeout_s,
                    ),
                    REASON_LIMITS,
                )
            elif (
                policy.cpu_time_s
                and cpu_at_start is not None
                and cpu_at_start >= 0
                and usage.cpu_s is not None
                and usage.cpu_s - cpu_at_start > policy.cpu_time_s
            ):
                used = usage.cpu_s - cpu_at_start
                verdict = _Verdict(
                    Status.TIMEOUT,
                    ErrorDetail(
                        "CpuTimeExceeded",
                        f"the sandbox used more than its CPU-time limit of {policy.cpu_time_s:g} s",
                        measured_s=used,
                        limit_s=policy.cpu_time_s,
                    ),
                    REASON_LIMITS,
                )
            elif first_beat is None and now - running_since > BOOT_LIMIT_S:
                verdict = _Verdict(
                    Status.TIMEOUT,
                    ErrorDetail(
                        "BootTimeout",
                        f"the sandbox did not boot within {BOOT_LIMIT_S:g} s",
                        measured_s=now - running_since,
                        limit_s=BOOT_LIMIT_S,
                    ),
                    REASON_LIMITS,
                )
            else:
                verdict = self._liveness(now, running_since, usage)
            if verdict is not None:
                break
            self.wake.wait(tick)
            self.wake.clear()

        if session.config_fetched_at is not None:
            self.timings["boot"] = session.config_fetched_at - running_since
        handed_over = session.beat_stats.first_beat is not None
        if verdict is not None:
            self.backend.kill(cid)
            if self.adopt is not None and not handed_over and verdict.status is Status.TIMEOUT:
                raise HandOverFailed(f"the warm sandbox did not take its task: {verdict.error.message}")
            return self._outcome(verdict.status, error=verdict.error), verdict.reason
        if session.finish is not None:
            # The runtime exits by itself after reporting; give it a moment.
            if not _wait_for(lambda: bool(exit_box), EXIT_GRACE_S):
                self.backend.kill(cid)
            return self._from_report(session.finish)
        if self.adopt is not None and not handed_over:
            raise HandOverFailed("the warm sandbox ended before it took its task")
        return self._from_exit(exit_box[0], cid, usage)

    def _still_suspect(self, now: float, limit: float) -> bool:
        """Whether a silent sandbox whose CPU time stood still is still under its second look.

        The first call takes a look at its threads and says yes; calls go on
        saying yes until :func:`confirm_s` has passed, then the second look is
        taken and ``self._starved`` says whether the two show it wanting the
        host (slow). A watch that itself woke late (this process starved: the
        beats it did not hear may be waiting in it) starts the look afresh.
        """
        if self._suspect is not None and now - self._suspect[2] > self._tick + confirm_s(limit) / 2:
            log.debug("task %s: the supervisor woke late; looking again", self.session.task_id)
            self._suspect = None
        if self._suspect is None:
            self._suspect = (now, self.backend.scheduling(self._cid), now)
            return True
        since, first, _ = self._suspect
        if now - since < confirm_s(limit):
            self._suspect = (since, first, now)
            return True
        self._starved = moving(first, self.backend.scheduling(self._cid), now - since)
        return False

    def _liveness(self, now: float, running_since: float, usage: UsageWatch) -> _Verdict | None:
        """A verdict if the sandbox is frozen (or out of memory) or stuck, else ``None``."""
        policy = self.policy
        stats = self.session.beat_stats
        fetched = self.session.config_fetched_at
        if stats.last_beat is not None:
            last, limit = stats.last_beat, policy.heartbeat_timeout_s
        elif fetched is not None:
            # Configured but no beat yet: the runtime beats before it loads any
            # protocol code, so this is a hang like any other.
            last, limit = fetched, policy.heartbeat_timeout_s
        else:
            last, limit = running_since, max(policy.heartbeat_timeout_s, BOOT_GRACE_S)
        silence = now - last
        if silence <= limit:
            self._suspect = None
        if silence > limit:
            usage.sample(now, force=True)
            if usage.oom_kills():
                # Under gVisor a sandbox the kernel's OOM killer hit may hang
                # rather than exit: silent, and the cgroup says why.
                return self._out_of_memory_verdict()
            # Over the latter half of the silence only: the sandbox's work up to
            # the moment it froze (and gVisor's as it stops) must not delay the verdict.
            window = limit / 2
            cpu = usage.cpu_over(window, now)
            if not busy(cpu, window) and self._still_suspect(now, limit):
                return None  # looked at once more before it is judged
            self._suspect = None
            if busy(cpu, window) or self._starved:
                if not self._slow_noted:
                    self._slow_noted = True
                    log.warning(
                        "task %s: no heartbeat for %.1f s, but the sandbox used %.3f s of CPU over the "
                        "last %g s%s: slow (a busy host?), not frozen; still watching",
                        self.session.task_id,
                        silence,
                        cpu or 0.0,
                        window,
                        " and its threads wait for the host" if self._starved else "",
                    )
                self._starved = False
                return None
            return _Verdict(
                Status.TIMEOUT,
                ErrorDetail(
                    "HeartbeatTimeout",
                    f"the sandbox sent no heartbeat for {silence:.2f} s (limit {limit:g} s) and its CPU "
                    "time stood still: it is frozen or hung",
                    measured_s=silence,
                    limit_s=limit,
                ),
                REASON_LIMITS,
            )
        if policy.stall_timeout_s and stats.last_progress is not None:
            idle = now - stats.last_progress
            if idle > policy.stall_timeout_s:
                return _Verdict(
                    Status.TIMEOUT,
                    ErrorDetail(
                        "StallTimeout",
                        f"the sandbox is alive but made no progress for {idle:.1f} s (limit "
                        f"{policy.stall_timeout_s:g} s): no progress event, mailbox operation or "
                        "movement of its main thread",
                        measured_s=idle,
                        limit_s=policy.stall_timeout_s,
                    ),
                    REASON_LIMITS,
                )
        return None

    def _out_of_memory_verdict(self) -> _Verdict:
        detail = self._out_of_memory_detail(exit_code=None, tail="")
        return _Verdict(Status.KILLED, detail, detail.type)

    def _out_of_memory_detail(self, *, exit_code: int | None, tail: str) -> ErrorDetail:
        return ErrorDetail(
            "OutOfMemory",
            f"the sandbox exceeded its memory limit of {self.policy.memory_mb} MiB and was killed",
            exit_code=exit_code,
            stderr_tail=tail,
            memory_limit_mb=self.policy.memory_mb,
        )

    def _cancel(self, cid: str, exit_box: list[ExitInfo | BaseException]) -> _Verdict:
        self.session.send_control(ControlKind.CANCEL, "cancelled by the operator")
        if _wait_for(lambda: bool(exit_box) or self.session.finished.is_set(), CANCEL_GRACE_S):
            how = "it stopped within the grace period"
        else:
            how = f"it was killed after a {CANCEL_GRACE_S:g} s grace period"
        return _Verdict(
            Status.CANCELLED,
            ErrorDetail(
                "Cancelled", f"the task was cancelled by the operator; {how}", limit_s=CANCEL_GRACE_S
            ),
            REASON_CANCELLED,
        )

    def _abort_modeller(self, reason: str, error: ErrorDetail) -> None:
        if self.notify_abort is None:
            return
        try:
            self.notify_abort(reason, error.type, error.message)
        except SandboxExecutorError as exc:
            log.warning("task %s: could not tell the modeller it aborted: %s", self.session.task_id, exc)

    def _outcome(self, status: Status, result: object = None, error: ErrorDetail | None = None) -> Outcome:
        return Outcome(self.session.task_id, status, result, self.policy.runtime, self.timings, error)

    def _from_report(self, report: FinishReport) -> tuple[Outcome, str]:
        self.timings.update(report.timings)
        if report.status is Status.OK:
            return self._outcome(Status.OK, report.result), ""
        if self.cancel is not None and self.cancel.is_set():
            return self._outcome(
                Status.CANCELLED,
                error=ErrorDetail(
                    "Cancelled", "the task was cancelled by the operator; it stopped gracefully"
                ),
            ), REASON_CANCELLED
        error = ErrorDetail(report.error_type or "Error", report.error_message, report.traceback)
        if report.status is Status.ABORT:
            return self._outcome(Status.ABORT, error=error), REASON_ABORTED
        return self._outcome(Status.ERROR, error=error), REASON_PROTOCOL_ERROR

    def _from_exit(
        self, exited: ExitInfo | BaseException, cid: str, usage: UsageWatch
    ) -> tuple[Outcome, str]:
        """How a container that ended without a result ended; the reason is the error type."""
        if isinstance(exited, BaseException):
            detail = ErrorDetail("ContainerLost", f"lost track of the container: {exited}")
            return self._outcome(Status.ERROR, error=detail), detail.type
        tail = self.backend.stderr_tail(cid, STDERR_TAIL_LINES)
        if exited.oom_killed or usage.oom_kills():
            status = Status.KILLED
            detail = self._out_of_memory_detail(exit_code=exited.exit_code, tail=tail)
        elif exited.exit_code in _SIGKILL_CODES:
            status = Status.KILLED
            detail = ErrorDetail(
                "Killed",
                "the sandbox was killed (SIGKILL) from outside the executor",
                exit_code=exited.exit_code,
                stderr_tail=tail,
            )
        else:
            status = Status.ERROR
            detail = ErrorDetail(
                "ContainerExited",
                f"the sandbox exited with code {exited.exit_code} before reporting a result",
                exit_code=exited.exit_code,
                stderr_tail=tail,
            )
        return self._outcome(status, error=detail), detail.type


def abort_message(reason: str, error_type: str, message: str) -> bytes:
    """The TASK_ABORT body the parent sends when a task ends without OK."""
    return json.dumps(
        {"message": message, "reason": reason, "exception_type": error_type, "traceback": ""}
    ).encode()


def _wait_for(condition: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= end:
            return False
        time.sleep(0.02)
    return True
