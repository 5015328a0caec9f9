"""The exceptions the parent side raises, all rooted at one base.

::

    SandboxExecutorError
    ├── ConfigurationError          bad input caught before any container starts
    │   ├── PolicyError             an isolation policy value or file is wrong
    │   ├── ProtocolBundleError     the protocol directory is unusable
    │   └── DataSourceError         the data directory is unusable
    ├── CapacityError               no room for another task now (e.g. every sandbox uid in use)
    ├── HostError                   the host refused a directory, file or socket the task needs
    ├── ProjectDatabaseError        the project database is corrupt, locked too long, or too new
    ├── BackendError                the container engine failed us
    │   ├── EngineUnavailableError  the engine cannot be reached
    │   ├── ImageNotFoundError      the sandbox image is not built
    │   └── ContainerError          a container could not be created or started
    ├── TransportError              the message service between pod and modeller failed
    ├── DecryptionError             a sealed body or share fails authentication
    └── LimitError                  what a sandbox sent passes one of its task's limits
        ├── MailboxLimitError       a mailbox body or share breaks a size, quota or peer rule
        ├── FileLimitError          a per-file outcome report breaks a cap
        └── ResultLimitError        result rows a protocol saves break a cap

:meth:`Executor.run <executor.runner.Executor.run>` raises the first five
branches. The last three meet a caller of the mailbox API (a
:class:`~executor.mailbox.transport.Transport`, a modeller); inside a task the
parent turns them into refusals the sandbox sees, never into exceptions out
of ``run``.

A protocol that fails is not an exception on the parent side: it is an
:class:`~executor.outcome.Outcome` with a non-OK status. What protocol code
itself may catch is a separate tree, rooted at
:class:`executor.sandbox.context.SandboxError`.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator


class SandboxExecutorError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigurationError(SandboxExecutorError):
    """The task, policy, protocol or data given to the executor is unusable."""


class PolicyError(ConfigurationError):
    """An isolation policy value is out of range or of the wrong type."""


class ProtocolBundleError(ConfigurationError):
    """The protocol directory cannot be turned into a bundle."""


class DataSourceError(ConfigurationError):
    """The data directory cannot be mounted into the sandbox."""


class CapacityError(SandboxExecutorError):
    """The task cannot start now because a host-wide resource is all in use.

    Retrying after another task ends may succeed; nothing was started.
    """


class HostError(SandboxExecutorError):
    """The host refused something the task needs: a directory, a file, a socket.

    The message names the path and the reason in one line; nothing was started,
    or what was started has been cleaned up.

    Attributes:
        path: The path concerned.
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def from_os_error(cls, what: str, path: object, exc: OSError) -> HostError:
        """``cannot <what> <path>: <reason>`` for an :class:`OSError` met at ``path``."""
        reason = exc.strerror or type(exc).__name__
        return cls(f"cannot {what} {path}: {reason}", path=str(path))


@contextlib.contextmanager
def host_errors(what: str, path: object) -> Iterator[None]:
    """Turn an :class:`OSError` met doing ``what`` at ``path`` into a one-line :class:`HostError`."""
    try:
        yield
    except OSError as exc:
        raise HostError.from_os_error(what, path, exc) from exc


class ProjectDatabaseError(SandboxExecutorError):
    """The project database cannot be used: corrupt, locked too long, of a newer schema, unwritable.

    Raised before anything is changed: a database that fails its checks is
    left exactly as it was.
    """


class BackendError(SandboxExecutorError):
    """The container engine failed.

    Attributes:
        task_id: The task that was being run, when known.
        container_id: The container concerned, when one exists.
    """

    def __init__(self, message: str, *, task_id: str | None = None, container_id: str | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.container_id = container_id


class EngineUnavailableError(BackendError):
    """The Docker engine cannot be reached."""


class ImageNotFoundError(BackendError):
    """The sandbox image named by the policy does not exist locally."""


class ContainerError(BackendError):
    """A container could not be created, started or inspected."""


class TransportError(SandboxExecutorError):
    """The message service between pod and modeller failed (or there is none)."""


class DecryptionError(SandboxExecutorError):
    """A sealed body or share fails authentication: wrong key, task, type or tampered."""


class LimitError(SandboxExecutorError):
    """What a sandbox sent passes one of its task's limits; the sandbox is refused."""


class MailboxLimitError(LimitError):
    """A body breaks the per-message or per-task limit, or its declared size."""


class FileLimitError(LimitError):
    """A per-file outcome report breaks a per-call or per-task cap."""


class ResultLimitError(LimitError):
    """Result rows a protocol saves break a per-call or per-task cap, or are not flat JSON."""
