"""The project database: what ran on a pod's data, which files it processed or failed, and its results.

One SQLite file (stdlib :mod:`sqlite3`) per pod, shared by every project and
task. The schema, at version :data:`SCHEMA_VERSION` (``PRAGMA user_version``)::

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

Guarantees:

* **Never trusted blindly.** Every connection first checks the file as
  :mod:`executor.data.dbfile` says: no symbolic link followed (at the file or
  beside it), this user's alone and writable by no one else, in a directory
  no one else may write, the very file that was checked once SQLite has it
  open, and holding only the objects its schema defines (no trigger or view
  planted in it ever runs). ``trusted_schema`` is off.
* **Checked before anything is written.** An existing file is first opened
  read-only; a file that is not a database, is corrupt (``PRAGMA quick_check``)
  or carries a schema newer than this code raises :class:`ProjectDatabaseError`
  and is left exactly as it was, with no ``-wal`` or ``-shm`` file beside it.
* **Tested upgrades.** :data:`MIGRATIONS` is an ordered list of SQL scripts;
  opening an older database applies the missing ones and sets the version in
  one transaction, keeping its data (or applies none of them).
* **Nothing lost to concurrency.** Every operation opens its own connection,
  does its work in one transaction (``BEGIN IMMEDIATE`` for writes) and closes
  it, so tasks of one project writing at once from threads or processes
  serialise on SQLite's lock (WAL journal, ``busy_timeout``) and lose nothing.
  Waiting longer than ``busy_timeout_s`` raises a one-line error.
* **Rows stream in; a batch commits whole.** A batch's result rows are
  written as they arrive (:meth:`ProjectDatabase.stage_rows`, one short
  transaction per call of at most 1000 rows and 1 MiB), but no reader sees
  them until :meth:`ProjectDatabase.commit_batch` writes the batch's batch
  row, processed and failed files and the ledger's progress in one
  transaction: all of it or none of it. That commit does not touch the rows
  (a row is seen when its batch has a ``batches`` row), so it holds the write
  lock for milliseconds however many rows there are. The rows of a batch that
  did not commit are removed in chunks of at most 1000 rows and 1 MiB
  (:meth:`ProjectDatabase.discard_rows`; :meth:`ProjectDatabase.close_lost`
  for tasks whose executor died).

Times are aware datetimes, stored in UTC as ISO 8601 text; dictionaries
(policy, timings, selection, rows, statistics) are stored as JSON text.
"""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from executor.data import dbfile, logtail
from executor.errors import ProjectDatabaseError

if TYPE_CHECKING:
    from executor.data.scan import FileStamp

MAX_LOG_TAIL_CHARS = logtail.MAX_CHARS
RUNNING = "RUNNING"
LOST = "LOST"
LOST_MESSAGE = "the executor running the task stopped (killed or crashed) before it ended"
DISCARD_CHUNK_ROWS = 1000
"""Most result rows one transaction of :meth:`ProjectDatabase.discard_rows` removes."""
DISCARD_CHUNK_BYTES = 1024 * 1024
"""Most bytes of result rows one such transaction removes (after its first row)."""


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

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def _require_aware(name: str, value: datetime) -> None:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be an aware datetime, got {value!r}")


def _require_count(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")


@dataclass(frozen=True)
class TaskStart:
    """A task's ledger row as it starts: what runs, on what, under which policy."""

    task_id: str
    task_hash: str
    project: str
    modeller: str
    datasource: str
    bundle_sha256: str
    policy: dict[str, Any]
    runtime: str
    started_at: datetime
    selection: dict[str, int]
    total_batches: int
    test_run: bool
    owner: str = ""

    def __post_init__(self) -> None:
        if not self.task_id:
            raise ValueError("task_id must not be empty")
        _require_aware("started_at", self.started_at)
        _require_count("total_batches", self.total_batches)


@dataclass(frozen=True)
class TaskEnd:
    """How a task ended: what completes its ledger row."""

    task_id: str
    status: str
    error_type: str | None
    error_message: str | None
    timings: dict[str, Any]
    ended_at: datetime
    log_tail: str
    batches_done: int
    selection: dict[str, int]
    log_format: int = logtail.UNMARKED

    def __post_init__(self) -> None:
        _require_aware("ended_at", self.ended_at)
        _require_count("batches_done", self.batches_done)
        if self.status == RUNNING:
            raise ValueError(f"a task cannot end with status {RUNNING}")


@dataclass(frozen=True)
class FileStates:
    """What a task hash already did with a project's files.

    Attributes:
        processed: name -> (size, mtime_ns) of each file processed OK.
        failed: name -> (reason, attempts) of each file that failed.
        failed_stamps: name -> (size, mtime_ns) of each failed file as it
            was when it last failed (a file changed since is new data).
    """

    processed: dict[str, tuple[int, int]] = field(default_factory=dict)
    failed: dict[str, tuple[str, int]] = field(default_factory=dict)
    failed_stamps: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class BatchCommit:
    """Everything one batch leaves behind, committed together.

    A batch that ended OK commits all of it, and with it the result rows
    staged for it (:meth:`ProjectDatabase.stage_rows`). One that did not
    (``ok`` false) commits only its failed files, the seed's resilience phase:
    no processed files, and neither a batch row nor a batch done is recorded,
    so its staged rows are never seen and a later run starts that batch's
    files again.

    Attributes:
        batch: 1-based batch number, at most ``total_batches``.
        processed: Files of the batch processed OK.
        failed: Files of the batch that failed, each with its reason.
        record_processed: Whether processed files are recorded (not on a test
            run, so that a later real run still processes them).
        stats: The batch's statistics, stored as JSON.
        ok: Whether the batch ended OK.
    """

    task_id: str
    project: str
    task_hash: str
    batch: int
    total_batches: int
    processed: list[FileStamp]
    failed: list[tuple[FileStamp, str]]
    record_processed: bool
    started_at: datetime
    ended_at: datetime
    stats: dict[str, Any]
    ok: bool = True

    def __post_init__(self) -> None:
        if not self.ok and (self.processed or self.record_processed):
            raise ValueError("a batch that did not end OK commits no processed files")
        if not 1 <= self.batch <= self.total_batches:
            raise ValueError(f"batch {self.batch} is not in 1..{self.total_batches}")
        _require_aware("started_at", self.started_at)
        _require_aware("ended_at", self.ended_at)
        names = [f.name for f in self.processed] + [f.name for f, _ in self.failed]
        if len(set(names)) != len(names):
            raise ValueError("a file is named twice among a batch's processed and failed files")


@dataclass(frozen=True)
class ResultRecord:
    """One stored result row."""

    task_id: str
    task_hash: str
    batch: int
    row: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True)
class FailedFileRecord:
    """One file that failed under a task hash, with its latest reason."""

    task_hash: str
    name: str
    reason: str
    attempts: int
    last_task_id: str
    updated_at: datetime


@dataclass(frozen=True)
class TaskRecord:
    """One ledger row, decoded."""

    task_id: str
    task_hash: str
    project: str
    modeller: str
    datasource: str
    bundle_sha256: str
    policy: dict[str, Any]
    runtime: str
    status: str
    error_type: str | None
    error_message: str | None
    timings: dict[str, Any]
    selection: dict[str, int]
    total_batches: int
    batches_done: int
    test_run: bool
    started_at: datetime
    ended_at: datetime | None
    log_tail: str
    log_format: int = logtail.UNMARKED

    def log_lines(self) -> list[logtail.TailLine]:
        """The log tail's lines, each with its stream and batch (both ``None`` in an unmarked tail)."""
        return logtail.parse(self.log_tail, self.log_format)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _now() -> str:
    return _iso(datetime.now(UTC))


def _time(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _json(value: object) -> str:
    return json.dumps(value, sort_keys=True, allow_nan=False, separators=(",", ":"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _uri(path: Path, **params: str) -> str:
    query = urllib.parse.urlencode(params)
    return f"file:{urllib.parse.quote(str(path.absolute()))}?{query}"


class ProjectDatabase:
    """A project database file, created, checked and brought up to date on opening.

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

    def __init__(self, path: Path, *, busy_timeout_s: float = 10.0) -> None:
        if busy_timeout_s < 0 or math.isnan(busy_timeout_s):
            raise ValueError(f"busy_timeout_s must be >= 0, got {busy_timeout_s!r}")
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        # What every connection opens: the directory resolved, the file never through a link.
        self._file = dbfile.canonical(self.path)
        # The (device, inode) of the file first checked; every later connection must find it.
        self._identity: dbfile.Identity | None = None
        if not self._check_existing():
            self._create_file()
        self._bring_up_to_date()

    # -- opening -----------------------------------------------------------
    #
    # Nothing here opens the database file with a plain file descriptor: closing
    # one drops every POSIX lock this process holds on the file, including the
    # locks of SQLite connections in other threads, and lets writers collide.

    def _unusable(self, reason: str) -> ProjectDatabaseError:
        return ProjectDatabaseError(f"{self.path} is not a usable project database: {_one_line(reason)}")

    def _too_new(self, version: int) -> ProjectDatabaseError:
        return ProjectDatabaseError(
            f"project database {self.path} has schema version {version}, newer than"
            f" version {SCHEMA_VERSION} that this sandbox-executor knows; upgrade sandbox-executor"
        )

    def _check_existing(self) -> bool:
        """Whether the file exists, having checked read-only that it is a usable database.

        The file must first pass :func:`executor.data.dbfile.check_file` (no link,
        this user's alone, in a directory no one else may write). A database
        nobody has open (no ``-wal`` or ``-shm`` file) is read as immutable,
        which leaves no such file behind. That read bypasses SQLite's locks,
        so a connection that opens, writes and checkpoints meanwhile can tear
        it: a failure counts only when two reads, with the file unchanged and
        unopened across each, agree. A database in use is read under SQLite's
        locks, whose answer stands.
        """
        st = dbfile.check_file(self._file)
        if st is None:
            return False  # to be made; making it says what is in the way
        self._pin(st)
        if st.st_size == 0:
            return True  # being made by another process right now, or by touch: an empty database
        deadline = time.monotonic() + max(self.busy_timeout_s, 1.0)
        quiet_failures = 0
        while True:
            in_use = self._in_use()
            before = self._stamp()
            error: sqlite3.Error | None = None
            version, check, planted = 0, "", None
            try:
                version, check, planted = self._read_check(immutable=not in_use)
            except sqlite3.Error as exc:
                error = exc
            if (error is None and check == "ok" and planted is None) or in_use:
                break
            quiet = self._stamp() == before and not self._in_use()
            quiet_failures = quiet_failures + 1 if quiet else 0
            if quiet_failures >= 2 or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        if error is not None:
            raise self._error("check", error) from error
        if check != "ok":
            raise self._unusable(check)
        if version > SCHEMA_VERSION:
            raise self._too_new(version)
        if planted is not None:
            raise planted
        return True

    def _pin(self, st: os.stat_result) -> None:
        """Remember the file first checked; refuse any other found at the path later."""
        found = dbfile.identity(st)
        if self._identity is None:
            self._identity = found
        elif found != self._identity:
            raise ProjectDatabaseError(
                f"project database {self._file} is no longer the file this executor opened (it was"
                " replaced or moved); refusing it: open it again if that was meant"
            )

    def _in_use(self) -> bool:
        """Whether a connection has the database open in WAL mode (or one died with it open)."""
        return any(os.path.lexists(f"{self._file}{suffix}") for suffix in ("-wal", "-shm"))

    def _stamp(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.lstat(self._file)
        except OSError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns

    def _read_check(self, *, immutable: bool) -> tuple[int, str, ProjectDatabaseError | None]:
        """Read-only: the schema version, ``quick_check``'s verdict, and why its objects are refused.

        The objects' verdict is returned, not raised: an immutable read torn
        by a writer may see a schema that is not there (see :meth:`_check_existing`).

        Raises:
            ProjectDatabaseError: The file fails its checks (links, owner, a swap).
        """
        params = {"mode": "ro", "immutable": "1"} if immutable else {"mode": "ro"}
        planted = None
        with closing(self._open("check", params)) as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            rows = conn.execute("PRAGMA quick_check(1)").fetchall()
            check = "; ".join(str(r[0]) for r in rows)
            if check == "ok" and version <= SCHEMA_VERSION:
                try:
                    dbfile.check_objects(conn, self._file, MIGRATIONS[:version])
                except ProjectDatabaseError as exc:
                    planted = exc
        return version, check, planted

    def _create_file(self) -> None:
        """An empty database file, mode 0600, in directories made 0700, never through a link.

        It is made under a private name and linked into place, so that it
        never exists at its path with a wider mode, and no descriptor of it is
        closed once another connection may hold locks on it. Neither the
        private name nor the link follows a link planted at either path.
        """
        parent = self._file.parent
        missing = [p for p in (parent, *parent.parents) if not p.exists()]
        try:
            for directory in reversed(missing):
                with suppress(FileExistsError):
                    os.mkdir(directory, 0o700)
            dbfile.check_directory(parent)
            staging = parent / f".{self._file.name}.{secrets.token_hex(8)}.new"
            dbfile.create_exclusive(staging)
            try:
                os.link(staging, self._file)  # link() never follows a link at its target
            except FileExistsError:
                pass  # another process made it first (or a link is there): checked next
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
                    raise
                # No hard links here: claim the path itself (nobody can hold locks yet).
                with suppress(FileExistsError):
                    dbfile.create_exclusive(self._file)
            finally:
                with suppress(FileNotFoundError):
                    os.unlink(staging)
        except OSError as exc:
            raise ProjectDatabaseError(
                f"cannot create project database {self.path}: {exc.strerror or type(exc).__name__}"
            ) from exc

    def _use_wal(self, conn: sqlite3.Connection) -> str:
        """Switch a new file to WAL mode; the journal mode it is in."""
        deadline = time.monotonic() + self.busy_timeout_s
        while True:
            mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
            if mode == "wal":
                return mode
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
            except sqlite3.OperationalError as exc:
                # Another connection has the new file open: SQLite does not wait
                # for it here (it would risk a deadlock), so wait in turns.
                busy = getattr(exc, "sqlite_errorcode", 0) & 0xFF == _SQLITE_BUSY
                if not busy or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    def _bring_up_to_date(self) -> None:
        """WAL mode, and the migrations the file lacks applied in one transaction.

        The schema's objects are checked before the first write (the switch
        to WAL) and again under the write lock, before any migration runs.
        """
        with self._connect("open") as conn:
            try:
                self._check_schema(conn)
                mode = self._use_wal(conn)
                if mode != "wal":
                    raise ProjectDatabaseError(
                        f"project database {self.path} cannot use WAL journal mode (got {mode!r})"
                    )
                if int(conn.execute("PRAGMA user_version").fetchone()[0]) == SCHEMA_VERSION:
                    return
                conn.execute("BEGIN IMMEDIATE")
                try:
                    version = self._check_schema(conn)
                    for script in MIGRATIONS[version:]:
                        for statement in dbfile.statements(script):
                            conn.execute(statement)
                    if version != SCHEMA_VERSION:
                        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error("upgrade", exc) from exc

    def _check_schema(self, conn: sqlite3.Connection) -> int:
        """The file's schema version, having checked that it holds exactly that version's objects.

        Raises:
            ProjectDatabaseError: The version is newer than this code's, or
                the schema holds an object it does not define (a trigger, a
                view, a table or an index), lacks one, or has one changed.
        """
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        if version > SCHEMA_VERSION:
            raise self._too_new(version)
        dbfile.check_objects(conn, self._file, MIGRATIONS[:version])
        return version

    # -- connections -------------------------------------------------------

    def _error(self, doing: str, exc: sqlite3.Error, timeout_s: float | None = None) -> ProjectDatabaseError:
        code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
        if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
            waited = self.busy_timeout_s if timeout_s is None else timeout_s
            return ProjectDatabaseError(
                f"project database {self.path} is locked by another process (waited {waited:g} s)"
            )
        if code in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
            return self._unusable(str(exc))
        return ProjectDatabaseError(f"cannot {doing} project database {self.path}: {_one_line(str(exc))}")

    def _open(
        self, doing: str, params: dict[str, str], *, timeout_s: float | None = None
    ) -> sqlite3.Connection:
        """A connection to the checked file, opened with URI ``params``.

        The file passes :func:`executor.data.dbfile.check_file` first and must be
        the one this instance first checked; SQLite must then have opened
        exactly it (:func:`executor.data.dbfile.verify_opened`). Stored SQL may
        call no function with side effects (``trusted_schema`` off).

        Raises:
            ProjectDatabaseError: A check fails, or SQLite cannot open it.
        """
        timeout = self.busy_timeout_s if timeout_s is None else timeout_s
        st = dbfile.check_file(self._file)
        if st is None:
            raise ProjectDatabaseError(f"cannot {doing} project database {self.path}: it is gone")
        self._pin(st)
        try:
            conn = sqlite3.connect(
                _uri(self._file, **params), uri=True, timeout=timeout, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise self._error(doing, exc) from exc
        try:
            conn.execute("PRAGMA trusted_schema = OFF")
            dbfile.verify_opened(conn, self._file, dbfile.identity(st))
        except BaseException:
            conn.close()
            raise
        return conn

    @contextmanager
    def _connect(self, doing: str, *, timeout_s: float | None = None) -> Iterator[sqlite3.Connection]:
        """A fresh, checked connection, closed afterwards; sqlite errors become ProjectDatabaseError.

        Read-write even to read: SQLite falls back to reading a file it may
        not write, and the last read-write connection to close removes the
        ``-wal`` and ``-shm`` files, which a read-only one would leave behind.
        ``mode=rw`` never creates a file that was removed meanwhile.
        """
        try:
            with closing(self._open(doing, {"mode": "rw"}, timeout_s=timeout_s)) as conn:
                conn.execute("PRAGMA foreign_keys = ON")
                yield conn
        except sqlite3.Error as exc:
            raise self._error(doing, exc, timeout_s) from exc

    @contextmanager
    def _transaction(
        self, doing: str, *, write: bool, timeout_s: float | None = None, durable: bool = True
    ) -> Iterator[sqlite3.Connection]:
        """One transaction on a fresh connection: committed if the block returns, else rolled back.

        The schema's objects are checked inside it, before the block runs: no
        trigger or view planted since the file was opened ever runs here.
        ``durable`` false skips the fsync of this commit (``synchronous =
        NORMAL``): it stays atomic and consistent, and the next durable commit
        makes it durable too.
        """
        with self._connect(doing, timeout_s=timeout_s) as conn:
            if not durable:
                conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                self._check_schema(conn)
                yield conn
            except BaseException:
                # SQLite has already rolled back after some errors (a full disk).
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- the ledger ----------------------------------------------------------

    def start_task(self, record: TaskStart) -> None:
        """Insert a task's ledger row with status RUNNING.

        Raises:
            ProjectDatabaseError: A task with this id is already recorded.
        """
        r = record
        with self._transaction("record the start of a task in", write=True) as conn:
            if conn.execute("SELECT 1 FROM tasks WHERE task_id = ?", (r.task_id,)).fetchone():
                raise ProjectDatabaseError(f"task {r.task_id} is already recorded in {self.path}")
            conn.execute(
                "INSERT INTO tasks (task_id, task_hash, project, modeller, datasource, bundle_sha256,"
                " policy_json, runtime, status, selection_json, total_batches, batches_done, test_run,"
                " started_at, owner) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, ?, ?)",
                (
                    r.task_id,
                    r.task_hash,
                    r.project,
                    r.modeller,
                    r.datasource,
                    r.bundle_sha256,
                    _json(r.policy),
                    r.runtime,
                    RUNNING,
                    _json(r.selection),
                    r.total_batches,
                    int(r.test_run),
                    _iso(r.started_at),
                    r.owner,
                ),
            )

    def close_lost(self, alive: Callable[[str], bool]) -> list[str]:
        """Close as ``LOST`` the RUNNING rows of executors that are gone; their task ids.

        A parent killed mid-task leaves its row RUNNING; ``alive`` (an owner
        id -> whether that executor may still run) tells which are orphans.
        Rows without an owner are left alone. The result rows the orphans'
        uncommitted batches had written are removed (:meth:`discard_rows`).
        """
        with self._transaction("read the running tasks of", write=False) as conn:
            running = conn.execute(
                "SELECT task_id, owner FROM tasks WHERE status = ? AND owner != ''", (RUNNING,)
            ).fetchall()
        lost = [str(task_id) for task_id, owner in running if not alive(str(owner))]
        if not lost:
            return []
        with self._transaction("close the lost tasks of", write=True) as conn:
            conn.executemany(
                "UPDATE tasks SET status = ?, error_type = ?, error_message = ?, ended_at = ?"
                " WHERE task_id = ? AND status = ?",
                [(LOST, "ParentLost", LOST_MESSAGE, _now(), task_id, RUNNING) for task_id in lost],
            )
        # The rows their last batches were saving never commit now.
        for task_id in lost:
            self.discard_rows(task_id)
        return lost

    def end_task(self, end: TaskEnd) -> None:
        """Complete a task's ledger row; the log tail keeps its last whole lines (:data:`MAX_LOG_TAIL_CHARS`).

        Raises:
            ProjectDatabaseError: No task with this id was started.
        """
        e = end
        with self._transaction("record the end of a task in", write=True) as conn:
            cursor = conn.execute(
                "UPDATE tasks SET status = ?, error_type = ?, error_message = ?, timings_json = ?,"
                " ended_at = ?, log_tail = ?, log_format = ?, batches_done = ?, selection_json = ?"
                " WHERE task_id = ?",
                (
                    e.status,
                    e.error_type,
                    e.error_message,
                    _json(e.timings),
                    _iso(e.ended_at),
                    logtail.cut(e.log_tail, MAX_LOG_TAIL_CHARS),
                    e.log_format,
                    e.batches_done,
                    _json(e.selection),
                    e.task_id,
                ),
            )
            if cursor.rowcount != 1:
                raise ProjectDatabaseError(f"task {e.task_id} was never started in {self.path}")

    # -- files and results -----------------------------------------------------

    def file_states(self, project: str, task_hash: str) -> FileStates:
        """The files ``task_hash`` processed OK and those that failed, in ``project``."""
        with self._transaction("read file states from", write=False) as conn:
            processed = {
                str(name): (int(size), int(mtime_ns))
                for name, size, mtime_ns in conn.execute(
                    "SELECT name, size, mtime_ns FROM processed_files WHERE project = ? AND task_hash = ?",
                    (project, task_hash),
                )
            }
            failed: dict[str, tuple[str, int]] = {}
            failed_stamps: dict[str, tuple[int, int]] = {}
            for name, reason, attempts, size, mtime_ns in conn.execute(
                "SELECT name, reason, attempts, size, mtime_ns FROM failed_files"
                " WHERE project = ? AND task_hash = ?",
                (project, task_hash),
            ):
                failed[str(name)] = (str(reason), int(attempts))
                failed_stamps[str(name)] = (int(size), int(mtime_ns))
        return FileStates(processed=processed, failed=failed, failed_stamps=failed_stamps)

    def stage_rows(
        self, task_id: str, batch: int, rows: Sequence[str], *, timeout_s: float | None = None
    ) -> None:
        """Write result rows of a running batch, unseen until the batch commits; all of them or none.

        One short transaction, not fsynced (the batch's commit is): the rows
        of one SaveResults call (at most 1000 and 1 MiB), in the order given.
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
        now = _now()
        doing = f"save result rows of batch {batch} of task {task_id} to"
        with self._transaction(doing, write=True, timeout_s=timeout_s, durable=False) as conn:
            task = conn.execute(
                "SELECT project, task_hash, status, total_batches FROM tasks WHERE task_id = ?", (task_id,)
            ).fetchone()
            if task is None or task[2] != RUNNING:
                raise ProjectDatabaseError(
                    f"cannot save result rows: task {task_id} is not running in {self.path}"
                )
            project, task_hash, _, total = task
            if not 1 <= batch <= int(total):
                raise ProjectDatabaseError(
                    f"cannot save result rows: batch {batch} is not in 1..{total} of task {task_id}"
                )
            if conn.execute(
                "SELECT 1 FROM batches WHERE task_id = ? AND batch = ?", (task_id, batch)
            ).fetchone():
                raise ProjectDatabaseError(
                    f"cannot save result rows: batch {batch} of task {task_id} is already committed"
                )
            conn.executemany(
                "INSERT INTO results (project, task_hash, task_id, batch, row_json, created_at, pending,"
                " size) VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
                [(project, task_hash, task_id, batch, row, now, len(row.encode("utf-8"))) for row in rows],
            )

    def discard_rows(self, task_id: str, batch: int | None = None) -> int:
        """Remove the rows a task (one batch of it, if given) staged for batches that never committed.

        In chunks of at most :data:`DISCARD_CHUNK_ROWS` rows and
        :data:`DISCARD_CHUNK_BYTES` bytes, each its own short transaction, so
        another writer never waits long for the lock (SQLite here overwrites
        what it deletes). Rows of committed batches are never touched. Call
        it only when none of those batches is still saving rows. Returns how
        many rows went.

        Raises:
            ProjectDatabaseError: SQLite failed; the rows not yet removed stay
                unseen, and a later call removes them.
        """
        # Read from the index (task_id, batch, pending, size) alone.
        sql = (
            "SELECT r.id, r.size FROM results r WHERE r.task_id = ?1 AND (?2 IS NULL OR r.batch = ?2)"
            " AND r.pending = 1 AND NOT EXISTS"
            " (SELECT 1 FROM batches b WHERE b.task_id = r.task_id AND b.batch = r.batch) LIMIT ?3"
        )
        removed = 0
        while True:
            with self._transaction(
                f"remove uncommitted result rows of task {task_id} from", write=True
            ) as conn:
                chunk: list[int] = []
                size = 0
                for row_id, row_size in conn.execute(sql, (task_id, batch, DISCARD_CHUNK_ROWS)):
                    if chunk and size + int(row_size) > DISCARD_CHUNK_BYTES:
                        break
                    chunk.append(int(row_id))
                    size += int(row_size)
                if not chunk:
                    return removed
                conn.executemany("DELETE FROM results WHERE id = ?", [(row_id,) for row_id in chunk])
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
        try:
            stats = _json(c.stats)
        except (TypeError, ValueError) as exc:
            raise ProjectDatabaseError(
                f"cannot store batch {c.batch} of task {c.task_id}: not JSON ({_one_line(str(exc))})"
            ) from exc
        now = _now()
        key = (c.project, c.task_hash)
        with self._transaction(f"commit batch {c.batch} of task {c.task_id} to", write=True) as conn:
            if c.record_processed:
                conn.executemany(
                    "INSERT INTO processed_files (project, task_hash, name, size, mtime_ns, task_id,"
                    " processed_at) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (project, task_hash, name)"
                    " DO UPDATE SET size = excluded.size, mtime_ns = excluded.mtime_ns,"
                    " task_id = excluded.task_id, processed_at = excluded.processed_at",
                    [(*key, f.name, f.size, f.mtime_ns, c.task_id, now) for f in c.processed],
                )
                conn.executemany(
                    "DELETE FROM failed_files WHERE project = ? AND task_hash = ? AND name = ?",
                    [(*key, f.name) for f in c.processed],
                )
            conn.executemany(
                "INSERT INTO failed_files (project, task_hash, name, reason, attempts, size, mtime_ns,"
                " last_task_id, updated_at) VALUES (?, ?, ?, ?, 1, ?, ?, ?, ?)"
                " ON CONFLICT (project, task_hash, name) DO UPDATE SET reason = excluded.reason,"
                " attempts = failed_files.attempts + 1, size = excluded.size, mtime_ns = excluded.mtime_ns,"
                " last_task_id = excluded.last_task_id, updated_at = excluded.updated_at",
                [(*key, f.name, reason, f.size, f.mtime_ns, c.task_id, now) for f, reason in c.failed],
            )
            conn.executemany(
                "DELETE FROM processed_files WHERE project = ? AND task_hash = ? AND name = ?",
                [(*key, f.name) for f, _ in c.failed],
            )
            if not c.ok:
                return
            # Counted from the index: no row is read, let alone rewritten.
            (rows,) = conn.execute(
                "SELECT count(*) FROM results WHERE task_id = ? AND batch = ? AND pending = 1",
                (c.task_id, c.batch),
            ).fetchone()
            conn.execute(
                "INSERT INTO batches (task_id, batch, project, task_hash, total_batches, files, processed,"
                " failed, rows, started_at, ended_at, stats_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    c.task_id,
                    c.batch,
                    *key,
                    c.total_batches,
                    len(c.processed) + len(c.failed),
                    len(c.processed),
                    len(c.failed),
                    int(rows),
                    _iso(c.started_at),
                    _iso(c.ended_at),
                    stats,
                ),
            )
            conn.execute("UPDATE tasks SET batches_done = batches_done + 1 WHERE task_id = ?", (c.task_id,))

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
        # A row is seen when it was committed with its batch before v5 (pending
        # 0), or when its batch has committed since (it has a batches row).
        sql = (
            "SELECT r.task_id, r.task_hash, r.batch, r.row_json, r.created_at FROM results r"
            " WHERE r.project = ? AND (r.pending = 0 OR EXISTS"
            " (SELECT 1 FROM batches b WHERE b.task_id = r.task_id AND b.batch = r.batch))"
        )
        params: list[object] = [project]
        if task_hash is not None:
            sql += " AND r.task_hash = ?"
            params.append(task_hash)
        if task_id is not None:
            sql += " AND r.task_id = ?"
            params.append(task_id)
        if batch is not None:
            sql += " AND r.batch = ?"
            params.append(batch)
        sql += " ORDER BY r.id" + _limit(limit, params)
        with self._transaction("read results from", write=False) as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            ResultRecord(
                task_id=task_id,
                task_hash=th,
                batch=int(batch),
                row=json.loads(row_json),
                created_at=_time(created_at),
            )
            for task_id, th, batch, row_json, created_at in rows
        ]

    def failed_files(self, project: str, task_hash: str | None = None) -> list[FailedFileRecord]:
        """Files that failed in ``project`` (under one task hash if given), by task hash and name."""
        sql = (
            "SELECT task_hash, name, reason, attempts, last_task_id, updated_at FROM failed_files"
            " WHERE project = ?"
        )
        params: list[object] = [project]
        if task_hash is not None:
            sql += " AND task_hash = ?"
            params.append(task_hash)
        sql += " ORDER BY task_hash, name"
        with self._transaction("read failed files from", write=False) as conn:
            rows = conn.execute(sql, params).fetchall()
        return [
            FailedFileRecord(
                task_hash=th,
                name=name,
                reason=reason,
                attempts=int(attempts),
                last_task_id=last_task_id,
                updated_at=_time(updated_at),
            )
            for th, name, reason, attempts, last_task_id, updated_at in rows
        ]

    def tasks(self, project: str | None = None, *, limit: int | None = None) -> list[TaskRecord]:
        """Ledger rows (of one project if given), newest first, at most ``limit``."""
        sql = (
            "SELECT task_id, task_hash, project, modeller, datasource, bundle_sha256, policy_json, runtime,"
            " status, error_type, error_message, timings_json, selection_json, total_batches, batches_done,"
            " test_run, started_at, ended_at, log_tail, log_format FROM tasks"
        )
        params: list[object] = []
        if project is not None:
            sql += " WHERE project = ?"
            params.append(project)
        sql += " ORDER BY started_at DESC, rowid DESC" + _limit(limit, params)
        with self._transaction("read tasks from", write=False) as conn:
            rows = conn.execute(sql, params).fetchall()
        return [_task_record(row) for row in rows]


def _limit(limit: int | None, params: list[object]) -> str:
    if limit is None:
        return ""
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise ValueError(f"limit must be a non-negative int, got {limit!r}")
    params.append(limit)
    return " LIMIT ?"


def _task_record(row: Sequence[Any]) -> TaskRecord:
    (
        task_id,
        task_hash,
        project,
        modeller,
        datasource,
        bundle_sha256,
        policy_json,
        runtime,
        status,
        error_type,
        error_message,
        timings_json,
        selection_json,
        total_batches,
        batches_done,
        test_run,
        started_at,
        ended_at,
        log_tail,
        log_format,
    ) = row
    return TaskRecord(
        task_id=task_id,
        task_hash=task_hash,
        project=project,
        modeller=modeller,
        datasource=datasource,
        bundle_sha256=bundle_sha256,
        policy=_object(policy_json),
        runtime=runtime,
        status=status,
        error_type=error_type,
        error_message=error_message,
        timings=_object(timings_json),
        selection=_object(selection_json),
        total_batches=int(total_batches),
        batches_done=int(batches_done),
        test_run=bool(test_run),
        started_at=_time(started_at),
        ended_at=_time(ended_at) if ended_at is not None else None,
        log_tail=log_tail,
        log_format=int(log_format),
    )


def _object(text: str) -> dict[str, Any]:
    value = json.loads(text)
    return value if isinstance(value, dict) else {}


__all__ = [
    "MAX_LOG_TAIL_CHARS",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "BatchCommit",
    "FailedFileRecord",
    "FileStates",
    "ProjectDatabase",
    "ResultRecord",
    "TaskEnd",
    "TaskRecord",
    "TaskStart",
]
