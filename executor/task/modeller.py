"""What the parent itself tells the modeller of a task, beside what its sandboxes send.

The modeller's readiness reaches whichever batch's sandbox is current
(:class:`ReadyRelay`); a batched task's messages (how many batches, which one
runs, how they ended) and the TASK_ABORT notice of a task that ends early
come from the parent. A modeller that cannot be reached never stops a task.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from executor.errors import SandboxExecutorError
from executor.events import ControlKind
from executor.task.supervisor import abort_message

if TYPE_CHECKING:
    from executor.mailbox.broker import MailboxBroker
    from executor.outcome import ErrorDetail
    from executor.rpc.session import TaskSession
    from executor.sandbox.contract import MessageType

log = logging.getLogger(__name__)


class ReadyRelay:
    """Passes the modeller's readiness to whichever batch's sandbox is current."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready = False
        self._session: TaskSession | None = None

    def modeller_ready(self) -> None:
        """The modeller is ready: the current sandbox hears it now, later ones when attached."""
        with self._lock:
            self._ready = True
            session = self._session
        if session is not None:
            session.send_control(ControlKind.MODELLER_READY)

    def attach(self, session: TaskSession | None) -> None:
        """Make ``session`` the current sandbox's (``None``: none is)."""
        with self._lock:
            self._session = session
            ready = self._ready
        if ready and session is not None:
            session.send_control(ControlKind.MODELLER_READY)


def abort_modeller(broker: MailboxBroker, task_id: str, reason: str, error: ErrorDetail | None) -> None:
    """Tell the modeller the task ends here (once per task, see :meth:`MailboxBroker.send_abort`)."""
    if error is None:
        return
    try:
        broker.send_abort(abort_message(reason, error.type, error.message))
    except SandboxExecutorError as exc:
        log.warning("task %s: could not tell the modeller it aborted: %s", task_id, exc)


def tell_modeller(broker: MailboxBroker, task_id: str, message_type: MessageType, body: bytes) -> None:
    """Send a batch message (the contract's body); an unreachable modeller does not stop the task."""
    try:
        broker.send_bytes(message_type, body)
    except Exception as exc:  # the transport's failure is the modeller's loss, not the task's
        log.info("task %s: could not send %s to the modeller: %s", task_id, message_type, exc)
