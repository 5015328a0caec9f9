"""The public API: its names (written once, in the package) resolve, and `import executor` imports none."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

import executor
import executor.errors

PUBLIC = sorted(set(executor.__all__) - {"__version__"})


def test_all_lists_each_public_name_once_sorted_with_the_version():
    # The names come from one place, the package's TYPE_CHECKING imports.
    assert executor.__all__ == sorted(set(executor.__all__))
    assert "__version__" in executor.__all__
    assert {"Executor", "TaskSpec", "Outcome", "IsolationPolicy", "SandboxExecutorError"} <= set(PUBLIC)
    assert set(PUBLIC) <= set(dir(executor))


@pytest.mark.parametrize("name", PUBLIC)
def test_each_public_name_resolves_to_its_defining_module(name):
    obj = getattr(executor, name)
    assert obj.__name__ == name
    # Defined in the module it is imported from, or in a submodule of it (executor.testing).
    source = executor._public()[name]
    assert obj.__module__ == source or obj.__module__.startswith(source + ".")


def test_from_executor_import_star_gives_exactly_the_public_names():
    namespace: dict[str, object] = {}
    exec("from executor import *", namespace)
    assert sorted(k for k in namespace if k != "__builtins__") == executor.__all__


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
