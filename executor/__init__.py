"""sandbox-executor: run untrusted federated-learning protocols, one container per task.

The trusted parent side lives in this package's top-level modules; the untrusted
child runtime lives in :mod:`executor.sandbox`, which is copied into the sandbox
image. Importing this package must stay cheap and dependency-free, because the
child runtime imports it too: the public names below load lazily.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from executor.outcome import Outcome, Status
    from executor.policy import IsolationPolicy
    from executor.runner import Executor
    from executor.spec import TaskSpec

__all__ = ["Executor", "IsolationPolicy", "Outcome", "Status", "TaskSpec", "__version__"]

_LAZY = {
    "Executor": "executor.runner",
    "TaskSpec": "executor.spec",
    "Outcome": "executor.outcome",
    "Status": "executor.outcome",
    "IsolationPolicy": "executor.policy",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'executor' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
