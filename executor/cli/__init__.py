"""The operator's command line, ``sandbox-executor`` (see :mod:`~executor.cli.commands`).

- :mod:`~executor.cli.commands`: the argument parser and the commands.
- :mod:`~executor.cli.display`: progress bars and the printed outcome.
- :mod:`~executor.cli.doctor`: what this machine has and what is missing.
- :mod:`~executor.cli.terminal`: sandbox text made safe to print.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]

# The command line draws with rich; the library (``Executor``) does not need it,
# so it is the ``cli`` extra rather than a dependency of the core.
MISSING_RICH = (
    "sandbox-executor: error: the command line needs the 'cli' extra: pip install 'sandbox-executor[cli]'"
)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit status (2, with the fix, when its extra is not installed)."""
    try:
        import rich  # noqa: F401  (only whether it is there)
    except ImportError:
        print(MISSING_RICH, file=sys.stderr)
        return 2
    from executor.cli.commands import main as run_cli

    return run_cli(argv)
