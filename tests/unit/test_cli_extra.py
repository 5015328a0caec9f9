"""The command line's extra: the library runs without rich, and the CLI says how to get it."""

from __future__ import annotations

import subprocess
import sys

BLOCK_RICH = "import sys; sys.modules['rich'] = None\n"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_library_never_loads_rich():
    got = _python(
        "import sys\n"
        "import executor\n"
        "from executor import Executor, TaskSpec, IsolationPolicy, ProjectDatabase\n"
        "import executor.runner, executor.task.run, executor.data.stores, executor.backends.docker\n"
        "print(sorted(m for m in sys.modules if m == 'rich' or m.startswith('rich.')))\n"
    )
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "[]"


def test_the_library_runs_where_rich_cannot_be_imported():
    got = _python(BLOCK_RICH + "from executor import Executor\nprint(Executor.__name__)\n")
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() == "Executor"


def test_the_cli_without_rich_is_one_line_with_the_fix():
    got = _python(BLOCK_RICH + "from executor.cli import main\nraise SystemExit(main(['doctor']))\n")
    assert got.returncode == 2
    assert got.stderr.strip().splitlines() == [
        "sandbox-executor: error: the command line needs the 'cli' extra: pip install 'sandbox-executor[cli]'"
    ]
