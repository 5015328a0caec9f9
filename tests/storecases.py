"""Project store records for the tests, and how the store tests open each registered store kind."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from executor.data.scan import FileStamp
from executor.data.store import BatchCommit, ProjectStore, TaskEnd, TaskStart

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

PROJECT = "oncology"
HASH = "hash-1"
T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

URLS: dict[str, Callable[[Path], str]] = {
    "sqlite": lambda tmp: f"sqlite://{tmp}/pod.db",
    "memory": lambda tmp: "memory:",
}
"""How the tests open each registered store kind (a directory of the test's own -> a URL);
a kind registered without an entry here fails ``test_every_registered_store_is_held_to_the_contract``."""


def start(
    task_id: str, *, project: str = PROJECT, task_hash: str = HASH, minute: int = 0, **kw: Any
) -> TaskStart:
    fields = {
        "task_id": task_id,
        "task_hash": task_hash,
        "project": project,
        "modeller": "alice",
        "datasource": "scans",
        "bundle_sha256": "ab" * 32,
        "policy": {"runtime": "runsc", "memory_mb": 512},
        "runtime": "runsc",
        "started_at": T0 + timedelta(minutes=minute),
        "selection": {"total": 3, "selected": 3},
        "total_batches": 2,
        "test_run": False,
    }
    fields.update(kw)
    return TaskStart(**fields)


def end(task_id: str, **kw: Any) -> TaskEnd:
    fields = {
        "task_id": task_id,
        "status": "OK",
        "error_type": None,
        "error_message": None,
        "timings": {"total": 1.5},
        "ended_at": T0 + timedelta(hours=1),
        "log_tail": "done\n",
        "batches_done": 2,
        "selection": {"total": 3, "selected": 2, "over_limit": 1},
    }
    fields.update(kw)
    return TaskEnd(**fields)


def stamp(name: str, size: int = 10, mtime_ns: int = 1) -> FileStamp:
    return FileStamp(name=name, size=size, mtime_ns=mtime_ns)


def commit(task_id: str, batch: int = 1, *, total: int = 2, task_hash: str = HASH, **kw: Any) -> BatchCommit:
    fields = {
        "task_id": task_id,
        "project": PROJECT,
        "task_hash": task_hash,
        "batch": batch,
        "total_batches": total,
        "processed": [],
        "failed": [],
        "record_processed": True,
        "started_at": T0,
        "ended_at": T0 + timedelta(seconds=5),
        "stats": {"files": 0},
    }
    fields.update(kw)
    return BatchCommit(**fields)


def texts(*rows: dict[str, Any]) -> list[str]:
    return [json.dumps(row, allow_nan=False) for row in rows]


def save(store: ProjectStore, task_id: str, batch: int = 1, *, rows: Any = (), **kw: Any) -> None:
    """What the executor does with a batch: stage its rows as they come, then commit it."""
    if rows:
        store.stage_rows(task_id, batch, texts(*rows))
    store.commit_batch(commit(task_id, batch, **kw))
