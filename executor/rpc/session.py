"""The parent's view of one running task: plain Python, no gRPC.

The servicer converts protobuf to the values below (through
:mod:`executor.rpc.serde`) and calls these methods;
the executor reads what they record. Every method validates its input, since
it all comes from untrusted code, and raises :class:`RequestRejected` with a
public message when it is wrong.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from executor.data.fileoutcomes import FileKind, FileLedger, FileLimitError
from executor.data.resultrows import (
    ResultLimitError,
    RowsClosed,
    RowSink,
    RowsNotStored,
    counting_sink,
)
from executor.events import Control, ControlKind, FinishReport, Report
from executor.mailbox.broker import Incoming, MailboxBroker, MailboxLimitError
from executor.mailbox.crypto import DecryptionError
from executor.mailbox.transport import TransportError
from executor.outcome import Status
from executor.rpc import checks
from executor.rpc.checks import FINISH_STATUSES as FINISH_STATUSES
from executor.rpc.checks import RequestRejected as RequestRejected
from executor.sandbox.contract import (
    MAX_POD_ID_CHARS,
    MAX_SHARE_BYTES,
    MAX_SHARES,
    RECEIVABLE,
    SENDABLE,
    ReportCase,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from executor.v1 import sandbox_pb2 as pb

log = logging.getLogger(__name__)

MAX_RECEIVE_TIMEOUT_S = 600.0
MAX_PENDING_RECEIVES = 4


@contextlib.contextmanager
def _mailbox_errors(task_id: str) -> Iterator[None]:
    """Turn broker and transport failures into public rejections."""
    try:
        yield
    except MailboxLimitError as exc:
        raise RequestRejected("RESOURCE_EXHAUSTED", str(exc)) from None
    except DecryptionError as exc:
        log.error("task %s: %s", task_id, exc)
        raise RequestRejected("DATA_LOSS", "a message from the modeller failed authentication") from None
    except TransportError as exc:
        log.warning("task %s: %s", task_id, exc)
        raise RequestRejected("UNAVAILABLE", str(exc)) from None


@contextlib.contextmanager
def _result_limits() -> Iterator[None]:
    """A per-task result cap is a RESOURCE_EXHAUSTED refusal."""
    try:
        yield
    except ResultLimitError as exc:
        raise RequestRejected("RESOURCE_EXHAUSTED", str(exc)) from None


@dataclass
class BeatStats:
    """What the parent knows of the sandbox's liveness."""

    beats: int = 0
    first_beat: float | None = None
    last_beat: float | None = None
    progress_events: int = 0
    mailbox_ops: int = 0
    main_thread_moved: bool = False
    last_progress: float | None = None


class TaskSession:
    """State shared between a task's gRPC handlers and its supervisor.

    Args:
        task_id: The task's identifier.
        config: The ``TaskConfig`` the sandbox fetches (built by :func:`executor.rpc.serde.task_config`).
        mailbox: The task's mailbox broker (limits, crypto, transport).
        max_result_bytes: Largest result JSON accepted.
        on_event: Called, from a server thread, with each report event the
            sandbox sends (progress, and any other kind of
            :class:`~executor.events.Report`), once checked.
        on_finish: Called once the terminal report is recorded.
        data_dir: The datasource on the host, to check reported file names against.
        rows: Where validated result rows go as they arrive (the task's
            :class:`~executor.data.resultrows.BatchRows`); by default they are
            counted within the per-batch caps and dropped.
    """

    def __init__(
        self,
        task_id: str,
        config: pb.TaskConfig,
        mailbox: MailboxBroker,
        *,
        max_result_bytes: int,
        on_event: Callable[[Report], None] | None = None,
        on_finish: Callable[[], None] | None = None,
        data_dir: Path | None = None,
        rows: RowSink | None = None,
    ) -> None:
        self.task_id = task_id
        self._config = config
        self.mailbox = mailbox
        self.max_result_bytes = max_result_bytes
        self._on_event = on_event
        self._on_finish = on_finish
        self._data_dir = data_dir
        self._files = FileLedger()
        self._rows = rows if rows is not None else counting_sink()
        self._lock = threading.Lock()
        self._pending_receives = 0
        self.config_fetched_at: float | None = None
        self.finish: FinishReport | None = None
        self.finished = threading.Event()
        self.beat_stats = BeatStats()
        self.controls: queue.Queue[Control | None] = queue.Queue()

    # -- configuration -------------------------------------------------
    def get_config(self) -> pb.TaskConfig:
        """The task configuration; records when it was first fetched."""
        with self._lock:
            if self.config_fetched_at is None:
                self.config_fetched_at = time.monotonic()
        return self._config

    # -- liveness ------------------------------------------------------
    def record_beat(self, progress_events: int, mailbox_ops: int, main_thread_moved: bool) -> None:
        """Note a heartbeat from the sandbox.

        The first one is answered with ``BEAT_SEEN``: the sandbox starts no
        protocol code before it, so a freeze at any instant of the protocol's
        life follows a beat the supervisor has seen.
        """
        with self._lock:
            s = self.beat_stats
            now = time.monotonic()
            if (
                s.last_progress is None
                or main_thread_moved
                or (progress_events, mailbox_ops) != (s.progress_events, s.mailbox_ops)
            ):
                s.last_progress = now
            s.beats += 1
            s.last_beat = now
            if s.first_beat is None:
                s.first_beat = now
            s.progress_events = progress_events
            s.mailbox_ops = mailbox_ops
            s.main_thread_moved = main_thread_moved
            if s.beats == 1:
                self.controls.put(Control(ControlKind.BEAT_SEEN))

    def end_for_abuse(self, error_type: str, reason: str) -> bool:
        """End the task from the parent's side, as an error; ``False`` if it had already finished.

        The sandbox's own result is refused after this, like any second one.
        """
        return self._finish_with(FinishReport(Status.ERROR, None, error_type, reason))

    def _finish_with(self, report: FinishReport) -> bool:
        """Record ``report`` as the task's end and wake the listener; ``False`` if it already ended."""
        with self._lock:
            if self.finish is not None:
                return False
            self.finish = report
        self.finished.set()
        if self._on_finish is not None:
            self._on_finish()
        return True

    def send_control(self, kind: ControlKind, reason: str = "") -> None:
        """Queue a control message down the heartbeat stream."""
        self.controls.put(Control(kind, reason))

    # -- mailbox -------------------------------------------------------
    def check_send(self, message_type: str, declared_size: int) -> None:
        """Refuse at once a send that could not succeed (type, size, a finished task).

        For a bulk send, before its bytes flow; the send itself checks again.
        """
        if message_type not in SENDABLE:
            raise RequestRejected("INVALID_ARGUMENT", f"a sandbox may not send {message_type} messages")
        self._refuse_after_finish()
        limit = self.mailbox.max_message_bytes
        if declared_size > limit:
            raise RequestRejected(
                "RESOURCE_EXHAUSTED", f"outgoing message is {declared_size} bytes; the limit is {limit}"
            )

    def send_message(self, message_type: str, declared_size: int, chunks: Iterator[bytes]) -> None:
        """Forward a message from the sandbox to the modeller, sealed by the broker."""
        if message_type not in SENDABLE:
            raise RequestRejected("INVALID_ARGUMENT", f"a sandbox may not send {message_type} messages")
        self._refuse_after_finish()

        def until_finished() -> Iterator[bytes]:
            yield from chunks
            # A body that was still arriving when the result came is not sent either.
            self._refuse_after_finish()

        with _mailbox_errors(self.task_id):
            self.mailbox.send(message_type, declared_size, until_finished())

    def _refuse_after_finish(self) -> None:
        """Mail from a task that has reported its result is refused: the modeller has moved on."""
        if self.finished.is_set():
            raise RequestRejected("FAILED_PRECONDITION", "the task has already finished")

    def receive_message(self, message_type: str, timeout_s: float) -> Incoming:
        """Wait for the modeller's next message of ``message_type``, opened."""
        if message_type not in RECEIVABLE:
            raise RequestRejected("INVALID_ARGUMENT", f"a sandbox may not receive {message_type} messages")
        with self._waiting(timeout_s), _mailbox_errors(self.task_id):
            incoming = self.mailbox.receive(message_type, timeout_s)
        if incoming is None:
            raise RequestRejected("DEADLINE_EXCEEDED", f"no {message_type} message within {timeout_s:g} s")
        return incoming

    def send_secure_shares(self, shares: dict[str, bytes]) -> None:
        """Seal each share for its peer pod and send it."""
        if not shares or len(shares) > MAX_SHARES:
            raise RequestRejected("INVALID_ARGUMENT", f"expected 1 to {MAX_SHARES} shares")
        for pod, share in shares.items():
            if not pod or len(pod) > MAX_POD_ID_CHARS or "\0" in pod:
                raise RequestRejected("INVALID_ARGUMENT", "invalid pod identifier")
            if len(share) > MAX_SHARE_BYTES:
                raise RequestRejected("INVALID_ARGUMENT", f"a share may be at most {MAX_SHARE_BYTES} bytes")
        self._refuse_after_finish()
        with _mailbox_errors(self.task_id):
            self.mailbox.send_shares(shares)

    def get_secure_shares(self, timeout_s: float) -> dict[str, bytes]:
        """One share from every peer pod, opened."""
        with self._waiting(timeout_s), _mailbox_errors(self.task_id):
            shares = self.mailbox.get_shares(timeout_s)
        if shares is None:
            raise RequestRejected(
                "DEADLINE_EXCEEDED", f"not every peer's share arrived within {timeout_s:g} s"
            )
        return shares

    @contextlib.contextmanager
    def _waiting(self, timeout_s: float) -> Iterator[None]:
        """Bound how long and how many of this task's calls may wait at once."""
        if not 0 <= timeout_s <= MAX_RECEIVE_TIMEOUT_S:
            raise RequestRejected("INVALID_ARGUMENT", f"timeout must be at most {MAX_RECEIVE_TIMEOUT_S:g} s")
        with self._lock:
            if self._pending_receives >= MAX_PENDING_RECEIVES:
                raise RequestRejected(
                    "RESOURCE_EXHAUSTED", f"at most {MAX_PENDING_RECEIVES} receives may wait at once"
                )
            self._pending_receives += 1
        try:
            yield
        finally:
            with self._lock:
                self._pending_receives -= 1

    # -- per-file outcomes ----------------------------------------------
    def report_files(self, outcomes: list[tuple[str, FileKind, str]] | list[tuple[str, str, str]]) -> None:
        """Record (name, kind, reason) per datasource file; names are checked strictly."""
        checked = checks.file_outcomes(outcomes, self._data_dir)
        with self._lock:
            try:
                self._files.record(checked)
            except FileLimitError as exc:
                raise RequestRejected("RESOURCE_EXHAUSTED", str(exc)) from None

    def file_outcomes(self) -> dict[str, tuple[FileKind, str]]:
        """A copy of the per-file outcomes reported so far."""
        with self._lock:
            return self._files.snapshot()

    # -- result rows ---------------------------------------------------
    def save_results(self, rows_json: list[str]) -> None:
        """Hand on result rows, each the JSON text of one flat object; the whole call or nothing.

        Each row must be a JSON object of 1 to MAX_COLUMNS columns, each named
        as :func:`~executor.sandbox.contract.is_column_name` says and holding
        a string, an integer within signed 64 bits, a finite number, a
        boolean or null. Duplicate column names, NaN and Infinity are refused.
        The rows go to the session's sink before the call returns; the
        session keeps none of them.

        Raises:
            RequestRejected: INVALID_ARGUMENT for a malformed call or row,
                RESOURCE_EXHAUSTED past a cap of the batch or the task,
                FAILED_PRECONDITION once the task (or batch) has finished,
                UNAVAILABLE when the rows could not be stored (none was).
        """
        checks.rows_call_count(rows_json)
        self._refuse_after_finish()
        size = checks.rows_call_size(rows_json)
        # Refused before any row is parsed when the budget is already spent.
        with _result_limits():
            self._rows.room_for(len(rows_json), size)
        checks.rows(rows_json)
        # A result recorded meanwhile ends the task: rows after it are refused like mail.
        if self.finish is not None:
            raise RequestRejected("FAILED_PRECONDITION", "the task has already finished")
        # Stored outside the session's lock: a slow store never holds up beats.
        with _result_limits():
            try:
                self._rows.save(list(rows_json), size)
            except RowsClosed:
                raise RequestRejected("FAILED_PRECONDITION", "the task has already finished") from None
            except RowsNotStored as exc:
                raise RequestRejected("UNAVAILABLE", str(exc)) from None

    # -- reports and result -------------------------------------------
    def take_report(self, case: str, report: Any) -> None:
        """A report by its case: file outcomes, result rows, or an event for the listener."""
        if case == ReportCase.FILES:
            self.report_files(report)
        elif case == ReportCase.ROWS:
            self.save_results(report)
        else:
            self.report_event(report)

    def report_event(self, event: Report) -> None:
        """Check a report event (progress, or any other kind) and pass it to the listener."""
        try:
            event.check()
        except ValueError as exc:
            raise RequestRejected("INVALID_ARGUMENT", str(exc)) from None
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:  # a listener's bug must not fail the sandbox's call
                log.exception("%s listener failed for task %s", event.event, self.task_id)

    def report_finish(
        self,
        status: Status,
        result_json: str,
        error_type: str,
        error_message: str,
        traceback: str,
        timings: dict[str, float],
    ) -> None:
        """Record the sandbox's terminal report; accepted once."""
        report = checks.finish_report(
            status, result_json, error_type, error_message, traceback, timings, self.max_result_bytes
        )
        if not self._finish_with(report):
            raise RequestRejected("FAILED_PRECONDITION", "the task has already finished")


class SessionRef:
    """The session a task server serves: given at once (a cold task) or bound later (a warm slot).

    A warm slot's server listens, and its sandbox connects and asks for its
    task, before the task exists. :meth:`wait` holds that request until
    :meth:`bind` hands the slot a task, or until :meth:`close`.
    """

    def __init__(self, session: TaskSession | None = None, *, name: str = "") -> None:
        self._session = session
        self._bound = threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self.name = name or (session.task_id if session is not None else "warm slot")
        if session is not None:
            self._bound.set()

    @property
    def session(self) -> TaskSession | None:
        """The bound session, or ``None`` while the slot waits for a task."""
        return self._session if self._bound.is_set() else None

    def bind(self, session: TaskSession) -> None:
        """Hand the slot its task: a waiting request gets the configuration at once.

        Raises:
            RuntimeError: The slot already has a task (a slot serves one only).
        """
        with self._lock:
            if self._bound.is_set() or self._closed.is_set():
                raise RuntimeError(f"{self.name} cannot take a task: it already has one or is closed")
            self._session = session
            self.name = session.task_id
            self._bound.set()

    def close(self) -> None:
        """Release any request still waiting; it is refused."""
        self._closed.set()

    def wait(self, is_active: Callable[[], bool], poll_s: float = 0.5) -> TaskSession | None:
        """The session once bound; ``None`` if the call ended or the slot closed first."""
        while not self._bound.wait(poll_s):
            if self._closed.is_set() or not is_active():
                return None
        return self._session
