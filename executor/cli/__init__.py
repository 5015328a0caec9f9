"""The operator's command line, ``sandbox-executor`` (see :mod:`~executor.cli.commands`).

- :mod:`~executor.cli.commands`: the argument parser and the commands.
- :mod:`~executor.cli.display`: progress bars and the printed outcome.
- :mod:`~executor.cli.doctor`: what this machine has and what is missing.
- :mod:`~executor.cli.terminal`: sandbox text made safe to print.
"""

from __future__ import annotations

from executor.cli.commands import main

__all__ = ["main"]
