"""What protocol code may catch from ``ctx``: one tree; no ``grpc`` exception ever reaches it.

::

    SandboxError            anything ctx reports as failed
    ├── TaskAborted         raised by ctx.abort(): the task ends with status ABORT
    ├── MailboxError        the parent refused or failed a mailbox or share operation
    │   └── MailboxTimeout  nothing arrived in time (also a TimeoutError)
    └── ReportRefused       a progress, file or result-rows report was refused (also a ValueError)

Each carries ``code``, the gRPC status name the parent answered with (empty
when the refusal was local), so a protocol can tell a limit from a lost parent.
"""

from __future__ import annotations

import grpc


class SandboxError(Exception):
    """Root of every exception ``ctx`` raises to protocol code.

    Attributes:
        code: The gRPC status name the parent answered with, or ``""``.
    """

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


class TaskAborted(SandboxError):
    """Raised by :meth:`Context.abort`: the task ends with status ABORT."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class MailboxError(SandboxError):
    """The parent refused or failed a mailbox operation."""


class MailboxTimeout(MailboxError, TimeoutError):
    """No message of the requested type arrived in time."""


class ReportRefused(SandboxError, ValueError):
    """A progress event, a per-file outcome or result rows were refused (bad value, cap reached, gone).

    ``code`` is empty when the sandbox refused them itself, before any call.
    """


def _status(exc: grpc.RpcError) -> tuple[str, str]:
    """The status name and public message of a failed call (any RpcError, even one without them)."""
    code = exc.code() if callable(getattr(exc, "code", None)) else None
    details = exc.details() if callable(getattr(exc, "details", None)) else None
    return (code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"), str(details or "no detail")
