"""Fixtures shared by the unit tests: protocol directories and task sessions, no Docker."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest

from executor.data.resultrows import BatchRows, TaskRows
from executor.mailbox.broker import MailboxBroker
from executor.mailbox.crypto import TaskKeys
from executor.mailbox.transport import Channel, Route
from executor.rpc.session import TaskSession
from executor.testing import InMemoryTransport, LocalModeller
from executor.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path

    from executor.events import ProgressUpdate

MINIMAL_PROTOCOL = "def run(ctx):\n    return {'ok': True}\n"


@pytest.fixture(autouse=True)
def private_state_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No unit test reads or writes the host's own project database (the CLI's default ``--db``).

    That file is the operator's (and another checkout's tests may be using
    it); a test that needs a database names one, or gets this private one.
    """
    monkeypatch.setenv("SANDBOX_EXECUTOR_STATE_DIR", str(tmp_path_factory.mktemp("state")))


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= end:
            return False
        time.sleep(0.01)
    return True


@pytest.fixture
def make_protocol(tmp_path: Path) -> Callable[..., Path]:
    """Make a protocol directory: ``protocol.py`` plus any extra files."""
    counter = itertools.count()

    def make(source: str = MINIMAL_PROTOCOL, files: dict[str, str | bytes] | None = None) -> Path:
        root = tmp_path / f"protocol-{next(counter)}"
        root.mkdir()
        (root / "protocol.py").write_text(source)
        for rel, content in (files or {}).items():
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
        return root

    return make


@dataclass
class SessionKit:
    """A task session wired to an in-memory modeller, and what its callbacks saw."""

    session: TaskSession
    modeller: LocalModeller
    transport: InMemoryTransport
    broker: MailboxBroker
    task_id: str
    progress: list[ProgressUpdate] = field(default_factory=list)
    finish_calls: list[None] = field(default_factory=list)
    rows: BatchRows | None = None
    stored: list[str] = field(default_factory=list)

    def saved(self) -> list[dict[str, Any]]:
        """The result rows the session handed on, in order, parsed."""
        return [json.loads(text) for text in self.stored]


@pytest.fixture
def make_session(tmp_path: Path) -> Iterator[Callable[..., SessionKit]]:
    """Build task sessions over a fresh in-memory transport; all closed afterwards."""
    counter = itertools.count()
    cleanups: list[Callable[[], None]] = []

    def make(
        *,
        task_id: str = "task-1",
        config: pb.TaskConfig | None = None,
        max_message_bytes: int = 1024 * 1024,
        max_task_bytes: int = 8 * 1024 * 1024,
        max_result_bytes: int = 1024,
        on_progress: Callable[[ProgressUpdate], None] | None = None,
        channel: Channel | None = None,
        data_dir: Path | None = None,
        task_rows: TaskRows | None = None,
    ) -> SessionKit:
        n = next(counter)
        spool = tmp_path / f"transport-{n}"
        spool.mkdir()
        modeller_spool = tmp_path / f"modeller-{n}"
        modeller_spool.mkdir()
        transport = InMemoryTransport(spool_dir=spool)
        modeller = LocalModeller(transport, spool_dir=modeller_spool)
        keys = TaskKeys.generate()
        modeller.add_task(task_id, keys)
        route = Route(task_id)
        broker = MailboxBroker(
            route,
            channel if channel is not None else transport.open(route),
            keys,
            tmp_path / f"broker-{n}",
            max_message_bytes=max_message_bytes,
            max_task_bytes=max_task_bytes,
        )
        progress: list[ProgressUpdate] = []
        finish_calls: list[None] = []
        # Rows go where a test can see them, past the per-batch caps only (unless it brings its own).
        stored: list[str] = []
        if task_rows is None:
            task_rows = TaskRows(max_rows=10**9, max_bytes=10**12, store=lambda _, rows: stored.extend(rows))
        rows = task_rows.batch(1)

        def record(update: ProgressUpdate) -> None:
            progress.append(update)
            if on_progress is not None:
                on_progress(update)

        session = TaskSession(
            task_id,
            config if config is not None else pb.TaskConfig(task_id=task_id),
            broker,
            max_result_bytes=max_result_bytes,
            on_event=record,
            on_finish=lambda: finish_calls.append(None),
            data_dir=data_dir,
            rows=rows,
        )
        cleanups.append(broker.close)
        cleanups.append(modeller.close)
        cleanups.append(transport.close)
        return SessionKit(session, modeller, transport, broker, task_id, progress, finish_calls, rows, stored)

    yield make
    for cleanup in reversed(cleanups):
        cleanup()
