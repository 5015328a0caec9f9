"""sandbox-executor: run untrusted federated-learning protocols, one container per task.

The trusted parent side lives in this package's modules and subpackages
(:mod:`executor.rpc`, :mod:`executor.mailbox`, :mod:`executor.cli`, ...); the
untrusted child runtime lives in :mod:`executor.sandbox`, which is copied into
the sandbox image. Importing this package must stay cheap and dependency-free,
because the child runtime imports it too: the public names below load lazily
(PEP 562), each from its own module on first use.

The public API is written once, as the imports under ``TYPE_CHECKING``: mypy
reads them there, and on first use :func:`_public` reads the same lines from
this file (with :mod:`ast`, which executes nothing) for the lazy loader,
``__all__`` and ``dir()``. To add a public name, add its import there.
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

_PUBLIC: dict[str, str] | None = None


def _public() -> dict[str, str]:
    """Each public name and the module it loads from: the imports under ``TYPE_CHECKING`` above."""
    global _PUBLIC
    if _PUBLIC is None:
        import ast

        with open(__file__, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=__file__)
        table: dict[str, str] = {}
        for node in tree.body:
            if (
                isinstance(node, ast.If)
                and isinstance(node.test, ast.Name)
                and node.test.id == "TYPE_CHECKING"
            ):
                for imp in node.body:
                    if isinstance(imp, ast.ImportFrom) and (imp.module or "").startswith("executor."):
                        table.update((alias.asname or alias.name, imp.module or "") for alias in imp.names)
        _PUBLIC = table
    return _PUBLIC


def __getattr__(name: str) -> Any:
    if name == "__all__":
        return sorted([*_public(), "__version__"])
    module_name = _public().get(name)
    if module_name is None:
        raise AttributeError(f"module 'executor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_public(), "__all__"})
