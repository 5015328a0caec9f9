"""sandbox-executor: run untrusted federated-learning protocols, one container per task.

The trusted parent side lives in this package's modules and subpackages
(:mod:`executor.rpc`, :mod:`executor.mailbox`, :mod:`executor.cli`, ...); the
untrusted child runtime lives in :mod:`executor.sandbox`, which is copied into
the sandbox image. Importing this package must stay cheap and dependency-free,
because the child runtime imports it too: the public names below load lazily
(PEP 562), each from its own module on first use.
"""

from __future__ import annotations

# Not imported from typing: the sandbox's init imports this package, and
# typing costs it several hundred system calls per task (mypy reads this name
# as typing's own).
TYPE_CHECKING = False

__version__ = "0.1.0"

if TYPE_CHECKING:
    from typing import Any

    from executor.data.sqlite.store import ProjectDatabase
    from executor.errors import (
        BackendError,
        CapacityError,
        ConfigurationError,
        ContainerError,
        DataSourceError,
        DecryptionError,
        EngineUnavailableError,
        FileLimitError,
        HostError,
        ImageNotFoundError,
        LimitError,
        MailboxLimitError,
        PolicyError,
        ProjectDatabaseError,
        ProtocolBundleError,
        ResultLimitError,
        SandboxExecutorError,
        TransportError,
    )
    from executor.events import (
        AlgorithmProgress,
        BatchRun,
        Event,
        FailedFilesSaved,
        LogLine,
        ResultsSaved,
        TaskContext,
        TaskEnded,
        TaskStarted,
    )
    from executor.hooks import EventsFile
    from executor.mailbox.crypto import TaskKeys
    from executor.mailbox.transport import Channel, Envelope, NoModellerTransport, Route, Transport
    from executor.outcome import ErrorDetail, Outcome, Status
    from executor.policy import IsolationPolicy
    from executor.policy.file import PolicySet, load_policy_file
    from executor.runner import Executor
    from executor.spec import InferenceLimits, TaskFlags, TaskSpec
    from executor.testing import InMemoryTransport, LocalModeller

_LAZY: dict[str, str] = {
    "Executor": "executor.runner",
    "TaskSpec": "executor.spec",
    "TaskFlags": "executor.spec",
    "InferenceLimits": "executor.spec",
    "Outcome": "executor.outcome",
    "Status": "executor.outcome",
    "ErrorDetail": "executor.outcome",
    "IsolationPolicy": "executor.policy",
    "PolicySet": "executor.policy.file",
    "load_policy_file": "executor.policy.file",
    "TaskKeys": "executor.mailbox.crypto",
    "Transport": "executor.mailbox.transport",
    "Channel": "executor.mailbox.transport",
    "Envelope": "executor.mailbox.transport",
    "Route": "executor.mailbox.transport",
    "NoModellerTransport": "executor.mailbox.transport",
    "InMemoryTransport": "executor.testing",
    "LocalModeller": "executor.testing",
    "SandboxExecutorError": "executor.errors",
    "ConfigurationError": "executor.errors",
    "PolicyError": "executor.errors",
    "ProtocolBundleError": "executor.errors",
    "DataSourceError": "executor.errors",
    "CapacityError": "executor.errors",
    "BackendError": "executor.errors",
    "EngineUnavailableError": "executor.errors",
    "ImageNotFoundError": "executor.errors",
    "ContainerError": "executor.errors",
    "HostError": "executor.errors",
    "TransportError": "executor.errors",
    "DecryptionError": "executor.errors",
    "LimitError": "executor.errors",
    "MailboxLimitError": "executor.errors",
    "FileLimitError": "executor.errors",
    "ResultLimitError": "executor.errors",
    "ProjectDatabaseError": "executor.errors",
    "ProjectDatabase": "executor.data.sqlite.store",
    "Event": "executor.events",
    "TaskContext": "executor.events",
    "TaskStarted": "executor.events",
    "AlgorithmProgress": "executor.events",
    "BatchRun": "executor.events",
    "ResultsSaved": "executor.events",
    "FailedFilesSaved": "executor.events",
    "LogLine": "executor.events",
    "TaskEnded": "executor.events",
    "EventsFile": "executor.hooks",
}

__all__ = [
    "AlgorithmProgress",
    "BackendError",
    "BatchRun",
    "CapacityError",
    "Channel",
    "ConfigurationError",
    "ContainerError",
    "DataSourceError",
    "DecryptionError",
    "EngineUnavailableError",
    "Envelope",
    "ErrorDetail",
    "Event",
    "EventsFile",
    "Executor",
    "FailedFilesSaved",
    "FileLimitError",
    "HostError",
    "ImageNotFoundError",
    "InMemoryTransport",
    "InferenceLimits",
    "IsolationPolicy",
    "LimitError",
    "LocalModeller",
    "LogLine",
    "MailboxLimitError",
    "NoModellerTransport",
    "Outcome",
    "PolicyError",
    "PolicySet",
    "ProjectDatabase",
    "ProjectDatabaseError",
    "ProtocolBundleError",
    "ResultLimitError",
    "ResultsSaved",
    "Route",
    "SandboxExecutorError",
    "Status",
    "TaskContext",
    "TaskEnded",
    "TaskFlags",
    "TaskKeys",
    "TaskSpec",
    "TaskStarted",
    "Transport",
    "TransportError",
    "__version__",
    "load_policy_file",
]


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'executor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
