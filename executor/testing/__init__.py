"""Test doubles for the parent side, never imported by the executor's production path.

- :mod:`~executor.testing.engine`: :class:`FakeBackend`, a scripted container
  engine (registered as the backend ``fake``), and the programs that play the
  sandbox in it;
  :mod:`~executor.testing.hostrun`: the program that runs the real child
  runtime as host processes.
- :mod:`~executor.testing.transport`: :class:`InMemoryTransport`, whose modeller
  side is this process.
- :mod:`~executor.testing.modeller`: :class:`LocalModeller`, a modeller in this
  process over an :class:`InMemoryTransport` (the demo and the benchmarks use it too).
"""

from __future__ import annotations

from executor.testing.engine import (
    SIGKILL_EXIT,
    FakeBackend,
    FakeContainer,
    Program,
    exits,
    hangs,
    killed_from_outside,
    lost,
    out_of_memory,
    then,
)
from executor.testing.hostrun import host_command, host_runtime
from executor.testing.modeller import LocalModeller, ModellerMessage, chunked
from executor.testing.transport import InMemoryChannel, InMemoryTransport

__all__ = [
    "SIGKILL_EXIT",
    "FakeBackend",
    "FakeContainer",
    "InMemoryChannel",
    "InMemoryTransport",
    "LocalModeller",
    "ModellerMessage",
    "Program",
    "chunked",
    "exits",
    "hangs",
    "host_command",
    "host_runtime",
    "killed_from_outside",
    "lost",
    "out_of_memory",
    "then",
]
