"""The SQLite project store: the :class:`~executor.data.store.ProjectStore` contract over one database file.

One SQLite file (stdlib :mod:`sqlite3`) per pod, shared by every project and
task; :class:`~executor.data.sqlite.database.DatabaseFile` opens it safely and
runs each operation in its own transaction on a fresh connection. Here each
operation says what it writes and what a refusal means; the statements are
in :mod:`~executor.data.sqlite.ledger`, :mod:`~executor.data.sqlite.files` and
:mod:`~executor.data.sqlite.rows`.

**Rows stream in; a batch commits whole.** :meth:`ProjectDatabase.stage_rows`
writes a batch's result rows as they arrive (one short transaction per call
of at most 1000 rows and 1 MiB, not fsynced), and
:meth:`ProjectDatabase.commit_batch` writes the batch row, processed and failed
files and the ledger's progress in one transaction without touching the
rows. The rows of a batch that did not commit are removed in chunks of at
most 1000 rows and 1 MiB (:meth:`ProjectDatabase.discard_rows`), so another
writer never waits long for the lock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from executor.data.sqlite import files, ledger
from executor.data.sqlite import rows as results_table
from executor.data.sqlite.database import DatabaseFile
from executor.data.sqlite.values import now
from executor.data.store import (
    BatchCommit,
    FailedFileRecord,
    FileStates,
    ResultRecord,
    TaskEnd,
    TaskRecord,
    TaskStart,
    stats_json,
)
from executor.errors import ProjectDatabaseError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence


class ProjectDatabase(DatabaseFile):
    """The SQLite project store: one database file, created, checked and brought up to date on opening.

    (Its name is the public API's, ``from executor import ProjectDatabase``, from before
    there were other stores.)

    Holds no connection: each method opens one, works in one transaction and
    closes it, so one instance may be shared by threads, and several
    processes may each have their own on the same file.

    Args:
        path: The database file; missing parent directories are made (0700)
            and a new file is made 0600.
        busy_timeout_s: How long an operation waits for another writer's lock.

    Raises:
        ProjectDatabaseError: The file is not a usable database, is of a newer
            schema, is locked longer than ``busy_timeout_s``, or cannot be made.
            Nothing was written.
    """

    # -- the ledger ----------------------------------------------------------

    def start_task(self, record: TaskStart) -> None:
        """Insert a task's ledger row with status RUNNING.

        Raises:
            ProjectDatabaseError: A task with this id is already recorded.
        """
        with self._transaction("record the start of a task in", write=True) as conn:
            if ledger.exists(conn, record.task_id):
                raise ProjectDatabaseError(f"task {record.task_id} is already recorded in {self.path}")
            ledger.insert(conn, record)

    def close_lost(self, alive: Callable[[str], bool]) -> list[str]:
        """Close as ``LOST`` the RUNNING rows of executors that are gone; their task ids.

        A parent killed mid-task leaves its row RUNNING; ``alive`` (an owner
        id -> whether that executor may still run) tells which are orphans.
        Rows without an owner are left alone. The result rows the orphans'
        uncommitted batches had written are removed (:meth:`discard_rows`).
        """
        with self._transaction("read the running tasks of", write=False) as conn:
            running = ledger.running_owned(conn)
        lost = [task_id for task_id, owner in running if not alive(owner)]
        if not lost:
            return []
        with self._transaction("close the lost tasks of", write=True) as conn:
            ledger.mark_lost(conn, lost, now())
        # The rows their last batches were saving never commit now.
        for task_id in lost:
            self.discard_rows(task_id)
        return lost

    def end_task(self, end: TaskEnd) -> None:
        """Complete a task's ledger row; the log tail keeps its last whole lines (``MAX_LOG_TAIL_CHARS``).

        Raises:
            ProjectDatabaseError: No task with this id was started.
        """
        with self._transaction("record the end of a task in", write=True) as conn:
            if not ledger.complete(conn, end):
                raise ProjectDatabaseError(f"task {end.task_id} was never started in {self.path}")

    # -- files and results -----------------------------------------------------

    def file_states(self, project: str, task_hash: str) -> FileStates:
        """The files ``task_hash`` processed OK and those that failed, in ``project``."""
        with self._transaction("read file states from", write=False) as conn:
            return files.states(conn, project, task_hash)

    def stage_rows(
        self, task_id: str, batch: int, rows: Sequence[str], *, timeout_s: float | None = None
    ) -> None:
        """Write result rows of a running batch, unseen until the batch commits; all of them or none.

        One short transaction, not fsynced (the batch's commit is): the rows
        of one result-rows report (at most 1000 and 1 MiB), in the order given.
        The task's project and task hash come from its ledger row.

        Args:
            task_id: The task, RUNNING in the ledger.
            batch: Its batch saving the rows, not yet committed.
            rows: Each the JSON text of one flat object, as
                :func:`executor.data.resultrows.check_row` accepts (the caller checks).
            timeout_s: How long to wait for another writer's lock (default:
                ``busy_timeout_s``).

        Raises:
            ProjectDatabaseError: The task is not running, the batch is not
                one of its batches or already committed, or SQLite failed
                (locked past the timeout, say); nothing was written.
        """
        if not rows:
            return
        written = now()
        doing = f"save result rows of batch {batch} of task {task_id} to"
        with self._transaction(doing, write=True, timeout_s=timeout_s, durable=False) as conn:
            task = ledger.running_batches(conn, task_id)
            if task is None:
                raise ProjectDatabaseError(
                    f"cannot save result rows: task {task_id} is not running in {self.path}"
                )
            project, task_hash, total = task
            if not 1 <= batch <= total:
                raise ProjectDatabaseError(
                    f"cannot save result rows: batch {batch} is not in 1..{total} of task {task_id}"
                )
            if results_table.committed(conn, task_id, batch):
                raise ProjectDatabaseError(
                    f"cannot save result rows: batch {batch} of task {task_id} is already committed"
                )
            results_table.stage(conn, (project, task_hash), task_id, batch, rows, written)

    def discard_rows(self, task_id: str, batch: int | None = None) -> int:
        """Remove the rows a task (one batch of it, if given) staged for batches that never committed.

        In chunks of at most :data:`~executor.data.sqlite.rows.DISCARD_CHUNK_ROWS`
        rows and :data:`~executor.data.sqlite.rows.DISCARD_CHUNK_BYTES` bytes,
        each its own short transaction, so another writer never waits long
        for the lock (SQLite here overwrites what it deletes). Rows of
        committed batches are never touched. Call it only when none of those
        batches is still saving rows. Returns how many rows went.

        Raises:
            ProjectDatabaseError: SQLite failed; the rows not yet removed stay
                unseen, and a later call removes them.
        """
        removed = 0
        while True:
            with self._transaction(
                f"remove uncommitted result rows of task {task_id} from", write=True
            ) as conn:
                chunk = results_table.uncommitted_chunk(conn, task_id, batch)
                if not chunk:
                    return removed
                results_table.delete(conn, chunk)
            removed += len(chunk)

    def commit_batch(self, commit: BatchCommit) -> None:
        """Store a batch's batch row, processed and failed files and progress, all or nothing.

        The result rows staged for the batch (:meth:`stage_rows`) are seen
        from this commit on, counted in its batch row but not rewritten. A
        file processed OK (when ``record_processed``) leaves ``failed_files``;
        a failed file leaves ``processed_files`` and counts one more attempt.
        A batch that did not end OK stores its failed files only; its staged
        rows stay unseen until :meth:`discard_rows` removes them.

        Raises:
            ProjectDatabaseError: The task was never started, this batch is
                already committed, the statistics are not JSON, or SQLite
                failed; nothing of the batch was stored.
        """
        c = commit
        stats = stats_json(c)
        written = now()
        with self._transaction(f"commit batch {c.batch} of task {c.task_id} to", write=True) as conn:
            files.record(conn, c, written)
            if not c.ok:
                return
            results_table.insert_batch(conn, c, stats)
            ledger.count_batch_done(conn, c.task_id)

    # -- reading -------------------------------------------------------------

    def results(
        self,
        project: str,
        task_hash: str | None = None,
        *,
        limit: int | None = None,
        task_id: str | None = None,
        batch: int | None = None,
    ) -> list[ResultRecord]:
        """Committed result rows of ``project``, oldest first, at most ``limit``.

        Narrowed to one task hash, one task and one batch of it when given
        (a hook that heard :class:`~executor.hooks.ResultsSaved` reads its
        batch's rows with ``task_id`` and ``batch``). Rows of a batch that has
        not committed (still running, or never will) are not among them.
        """
        with self._transaction("read results from", write=False) as conn:
            return results_table.select(conn, project, task_hash, limit, task_id, batch)

    def failed_files(self, project: str, task_hash: str | None = None) -> list[FailedFileRecord]:
        """Files that failed in ``project`` (under one task hash if given), by task hash and name."""
        with self._transaction("read failed files from", write=False) as conn:
            return files.failed(conn, project, task_hash)

    def tasks(self, project: str | None = None, *, limit: int | None = None) -> list[TaskRecord]:
        """Ledger rows (of one project if given), newest first, at most ``limit``."""
        with self._transaction("read tasks from", write=False) as conn:
            return ledger.select(conn, project, limit)
