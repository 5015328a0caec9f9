"""The SQLite project database's schema: the ordered migrations that make each version.

At version :data:`SCHEMA_VERSION` (``PRAGMA user_version``)::

    tasks            the ledger: one row per task, inserted RUNNING when it
                     starts, completed when it ends (status, error, timings,
                     selection counts, batches done, capped log tail); LOST
                     if the executor running it died first
    processed_files  (project, task_hash, name) -> size, mtime_ns, task_id:
                     what --new-data-only skips while a file is unchanged
    failed_files     (project, task_hash, name) -> reason, attempts, last_task_id:
                     what is skipped unless --force-rerun-failed
    results          rows a protocol saved, per project, task hash, task, batch;
                     written as the batch runs, seen once it commits
    batches          one row per committed batch: counts and statistics

:data:`MIGRATIONS` is an ordered list of SQL scripts; opening an older
database applies the missing ones and sets the version in one transaction,
keeping its data (or applies none of them). The objects each version defines
are also the only ones a database file may hold (:func:`executor.data.dbfile.check_objects`).
"""

from __future__ import annotations

# Version N is reached by applying MIGRATIONS[N - 1]. Append; never edit a
# script that has shipped, since databases out there were made by it.
MIGRATIONS: tuple[str, ...] = (
    # 1: the ledger, file states and results.
    """
    CREATE TABLE tasks (
        task_id        TEXT PRIMARY KEY,
        task_hash      TEXT NOT NULL,
        project        TEXT NOT NULL,
        modeller       TEXT NOT NULL,
        datasource     TEXT NOT NULL,
        bundle_sha256  TEXT NOT NULL,
        policy_json    TEXT NOT NULL,
        runtime        TEXT NOT NULL,
        status         TEXT NOT NULL DEFAULT 'RUNNING',
        error_type     TEXT,
        error_message  TEXT,
        timings_json   TEXT NOT NULL DEFAULT '{}',
        selection_json TEXT NOT NULL DEFAULT '{}',
        test_run       INTEGER NOT NULL DEFAULT 0,
        started_at     TEXT NOT NULL,
        ended_at       TEXT
    );
    CREATE INDEX tasks_by_start ON tasks (started_at);
    CREATE INDEX tasks_by_project ON tasks (project, started_at);
    CREATE TABLE processed_files (
        project      TEXT NOT NULL,
        task_hash    TEXT NOT NULL,
        name         TEXT NOT NULL,
        size         INTEGER NOT NULL,
        mtime_ns     INTEGER NOT NULL,
        task_id      TEXT NOT NULL REFERENCES tasks (task_id),
        processed_at TEXT NOT NULL,
        PRIMARY KEY (project, task_hash, name)
    );
    CREATE TABLE failed_files (
        project      TEXT NOT NULL,
        task_hash    TEXT NOT NULL,
        name         TEXT NOT NULL,
        reason       TEXT NOT NULL,
        attempts     INTEGER NOT NULL,
        size         INTEGER NOT NULL,
        mtime_ns     INTEGER NOT NULL,
        last_task_id TEXT NOT NULL REFERENCES tasks (task_id),
        updated_at   TEXT NOT NULL,
        PRIMARY KEY (project, task_hash, name)
    );
    CREATE TABLE results (
        id         INTEGER PRIMARY KEY AUTOINCREMENT,
        project    TEXT NOT NULL,
        task_hash  TEXT NOT NULL,
        task_id    TEXT NOT NULL REFERENCES tasks (task_id),
        row_json   TEXT NOT NULL,
        created_at TEXT NOT NULL
    );
    CREATE INDEX results_by_hash ON results (project, task_hash, id);
    CREATE INDEX results_by_task ON results (task_id);
    """,
    # 2: batched execution and log tails. A version-1 task ran as one batch,
    # done if it ended OK.
    """
    ALTER TABLE tasks ADD COLUMN total_batches INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE tasks ADD COLUMN batches_done INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE tasks ADD COLUMN log_tail TEXT NOT NULL DEFAULT '';
    UPDATE tasks SET batches_done = 1 WHERE status = 'OK';
    ALTER TABLE results ADD COLUMN batch INTEGER NOT NULL DEFAULT 1;
    CREATE TABLE batches (
        task_id       TEXT NOT NULL REFERENCES tasks (task_id),
        batch         INTEGER NOT NULL,
        project       TEXT NOT NULL,
        task_hash     TEXT NOT NULL,
        total_batches INTEGER NOT NULL,
        files         INTEGER NOT NULL,
        processed     INTEGER NOT NULL,
        failed        INTEGER NOT NULL,
        rows          INTEGER NOT NULL,
        started_at    TEXT NOT NULL,
        ended_at      TEXT NOT NULL,
        stats_json    TEXT NOT NULL,
        PRIMARY KEY (task_id, batch)
    );
    CREATE INDEX batches_by_hash ON batches (project, task_hash);
    """,
    # v3: which executor instance ran a task, so that a row left RUNNING by one
    # that died can be closed as LOST by the next.
    """
    ALTER TABLE tasks ADD COLUMN owner TEXT NOT NULL DEFAULT '';
    CREATE INDEX tasks_running ON tasks (status) WHERE status = 'RUNNING';
    """,
    # v4: the log tail's format (executor/data/logtail.py): 1 marks each line with
    # its stream; the tails of older rows are plain text, format 0.
    """
    ALTER TABLE tasks ADD COLUMN log_format INTEGER NOT NULL DEFAULT 0;
    """,
    # v5: result rows are written as their batch runs (pending), and are seen
    # only once it commits (its batches row); their size lets the rows of a
    # batch that did not end OK go in bounded chunks. Rows from before v5 were
    # committed with their batch, and stay seen.
    """
    ALTER TABLE results ADD COLUMN pending INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE results ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX results_by_batch ON results (task_id, batch, pending, size);
    DROP INDEX results_by_task;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)
