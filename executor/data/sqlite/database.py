"""Opening the SQLite project database file safely, bringing it up to date, and one transaction at a time.

Guarantees (the operations themselves are in :mod:`executor.data.sqlite.store`):

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
* **Tested upgrades.** The migrations of :mod:`executor.data.sqlite.schema`
  the file lacks are applied, and the version set, in one transaction.
* **Nothing lost to concurrency.** Every operation opens its own connection,
  does its work in one transaction (``BEGIN IMMEDIATE`` for writes) and closes
  it, so tasks of one project writing at once from threads or processes
  serialise on SQLite's lock (WAL journal, ``busy_timeout``) and lose nothing.
  Waiting longer than ``busy_timeout_s`` raises a one-line error.
"""

from __future__ import annotations

import errno
import math
import os
import secrets
import sqlite3
import time
import urllib.parse
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

from executor.data import dbfile
from executor.data.sqlite import schema
from executor.data.sqlite.values import one_line
from executor.errors import ProjectDatabaseError

if TYPE_CHECKING:
    from collections.abc import Iterator

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26


def _uri(path: Path, **params: str) -> str:
    query = urllib.parse.urlencode(params)
    return f"file:{urllib.parse.quote(str(path.absolute()))}?{query}"


class DatabaseFile:
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
        return ProjectDatabaseError(f"{self.path} is not a usable project database: {one_line(reason)}")

    def _too_new(self, version: int) -> ProjectDatabaseError:
        return ProjectDatabaseError(
            f"project database {self.path} has schema version {version}, newer than"
            f" version {schema.SCHEMA_VERSION} that this sandbox-executor knows; upgrade sandbox-executor"
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
        if version > schema.SCHEMA_VERSION:
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
            if check == "ok" and version <= schema.SCHEMA_VERSION:
                try:
                    dbfile.check_objects(conn, self._file, schema.MIGRATIONS[:version])
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
                if int(conn.execute("PRAGMA user_version").fetchone()[0]) == schema.SCHEMA_VERSION:
                    return
                conn.execute("BEGIN IMMEDIATE")
                try:
                    version = self._check_schema(conn)
                    for script in schema.MIGRATIONS[version:]:
                        for statement in dbfile.statements(script):
                            conn.execute(statement)
                    if version != schema.SCHEMA_VERSION:
                        conn.execute(f"PRAGMA user_version = {schema.SCHEMA_VERSION:d}")
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
        if version > schema.SCHEMA_VERSION:
            raise self._too_new(version)
        dbfile.check_objects(conn, self._file, schema.MIGRATIONS[:version])
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
        return ProjectDatabaseError(f"cannot {doing} project database {self.path}: {one_line(str(exc))}")

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
