"""What a task run may use of the executor that runs it: one frozen record, made once.

The :class:`~executor.runner.Executor` builds a :class:`TaskHost` when it is
made and hands it to every task it runs, so the task room never reaches back
into the API above it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    from executor.backends import ContainerBackend
    from executor.data.store import ProjectStore
    from executor.hooks import Hook
    from executor.mailbox.transport import Transport
    from executor.task.admission import StartGate
    from executor.task.uids import UidPool


@dataclass(frozen=True)
class TaskHost:
    """The host's side of every task: engine, directories, leases, ledger and listeners.

    Attributes:
        backend: The container engine.
        transport: Where mailbox traffic goes.
        run_dir: Where task directories go.
        spool_dir: Where large mailbox bodies are staged.
        uids: The host-wide uid leases.
        gate: The host's start permits.
        db: The project store, or ``None``: nothing is recorded.
        hooks: Called with every typed event of every task.
        view_method: How data views are made (see :class:`~executor.data.view.DataView`).
        instance_id: The executor instance, for labels, owner files and the ledger.
    """

    backend: ContainerBackend
    transport: Transport
    run_dir: Path
    spool_dir: Path
    uids: UidPool
    gate: StartGate
    db: ProjectStore | None
    hooks: tuple[Hook, ...]
    view_method: str
    instance_id: str
