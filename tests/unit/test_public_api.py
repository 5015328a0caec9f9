"""The public API: exactly these names, each resolving, and `import executor` importing none of them."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import executor
import executor.errors

PUBLIC = {
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
    "InMemoryTransport": "executor.testing.transport",
    "LocalModeller": "executor.testing.modeller",
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


def test_all_is_pinned_exactly():
    assert sorted(executor.__all__) == sorted([*PUBLIC, "__version__"])
    assert len(executor.__all__) == len(set(executor.__all__))


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_each_public_name_resolves_to_its_defining_module(name):
    obj = getattr(executor, name)
    assert obj.__module__ == PUBLIC[name]
    assert obj.__name__ == name


def test_every_error_in_the_tree_is_public():
    errors = {
        name
        for name, obj in vars(executor.errors).items()
        if inspect.isclass(obj) and issubclass(obj, executor.errors.SandboxExecutorError)
    }
    assert errors <= set(executor.__all__)
    for name in errors:
        assert issubclass(getattr(executor, name), executor.SandboxExecutorError)


def test_version_is_the_packages():
    from importlib.metadata import version

    assert executor.__version__ == version("sandbox-executor")


def test_unknown_names_are_attribute_errors():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        _ = executor.Nope


def test_importing_the_package_imports_no_parent_module():
    code = (
        "import json, sys; import executor; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('executor'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == ["executor"]


def test_the_production_path_does_not_import_the_test_doubles():
    code = (
        "import json, sys; import executor.runner, executor.cli; "
        "executor.Executor, executor.TaskSpec, executor.NoModellerTransport; "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('executor.testing'))))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
