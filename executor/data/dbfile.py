"""Opening the project database file without trusting it: no links, only its owner, only its schema.

The project database holds every task's results, so a file that someone else
can read, write or swap, or that carries SQL of someone else's, must never be
used. Before SQLite opens the file (on every connection, since each operation
opens its own) :func:`check_file` makes sure that:

* the path's last component is a regular file, not a symbolic link (SQLite
  would follow one; a new file is made with ``O_CREAT | O_EXCL | O_NOFOLLOW``);
* the file is owned by this process's effective user and writable by nobody
  else (group and others may not write it);
* its directory belongs to this user (or root) and no one else may write it,
  since SQLite makes its ``-wal``, ``-shm`` and ``-journal`` files there by
  name and follows a link planted in their place;
* those siblings, where they exist, pass the same checks as the file.

After SQLite has opened it, :func:`verify_opened` checks that SQLite opened
exactly the file that was checked (``PRAGMA database_list`` names the file
SQLite resolved, and the path still holds the checked inode once the first
read has opened the siblings), and :func:`check_objects` that the database
holds only the tables and indexes its schema version defines: a trigger,
view or extra table or index planted in it would run, or be trusted, inside
the executor's transactions. ``trusted_schema`` is turned off on every
connection, so SQL stored in the schema may call no function with side
effects. Every refusal is a one-line :class:`ProjectDatabaseError` that says
how to fix it, and leaves the file as it was.
"""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from executor.errors import ProjectDatabaseError

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

SIBLING_SUFFIXES = ("-wal", "-shm", "-journal")
"""The files SQLite keeps beside a database, by name."""

# What ANALYZE (or PRAGMA optimize) adds: statistics for the query planner,
# which an operator may make and which run no code.
_STATISTICS = frozenset({"sqlite_stat1", "sqlite_stat4"})

Identity = tuple[int, int]
"""A file's (device, inode)."""


def canonical(path: Path) -> Path:
    """``path`` with its directory resolved (links there are the operator's), its last component as given."""
    return Path(os.path.realpath(path.parent)) / path.name


def _quote(text: str, limit: int = 80) -> str:
    """Text from the file, as one ASCII line: a name in it may hold anything."""
    quoted = json.dumps(text[:limit], ensure_ascii=True)
    return quoted + ("…" if len(text) > limit else "")


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):04o}"


def _check_owned(path: Path, st: os.stat_result, what: str) -> None:
    """Refuse a file not owned by this user, or writable by group or others."""
    euid = os.geteuid()
    if st.st_uid != euid:
        raise ProjectDatabaseError(
            f"{what} {path} is owned by uid {st.st_uid}, not by this executor's user (uid {euid}),"
            f" who alone may read and write it; fix: chown {euid} {path} (or use another --db)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ProjectDatabaseError(
            f"{what} {path} is writable by group or others (mode {_mode(st)}); fix: chmod go-w {path}"
        )


def check_directory(directory: Path) -> None:
    """Refuse a database directory that another user owns or may write.

    Whoever may write it can swap the database, or plant a link where SQLite
    is about to make its ``-wal`` file, between any check and SQLite's open.
    """
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ProjectDatabaseError(
            f"cannot read the directory of project database {directory}: {exc.strerror}"
        ) from exc
    euid = os.geteuid()
    if st.st_uid not in (euid, 0):
        raise ProjectDatabaseError(
            f"the project database's directory {directory} is owned by uid {st.st_uid}, who could swap"
            f" the database; fix: keep it in a directory of uid {euid} or root (e.g. mkdir -m 700 DIR)"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        fix = (
            "keep the database in a directory only this user can write (e.g. mkdir -m 700 DIR)"
            if st.st_mode & stat.S_ISVTX
            else f"chmod go-w {directory}"
        )
        raise ProjectDatabaseError(
            f"the project database's directory {directory} is writable by group or others"
            f" (mode {_mode(st)}), who could swap the database or plant links beside it; fix: {fix}"
        )


def _check_sibling(path: Path) -> None:
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as exc:
        raise ProjectDatabaseError(f"cannot read {path}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):
        raise ProjectDatabaseError(
            f"{path} beside the project database is a symbolic link, which SQLite would follow;"
            f" fix: rm {path} (no executor may be using the database)"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ProjectDatabaseError(
            f"{path} beside the project database is not a regular file; fix: remove it"
        )
    _check_owned(path, st, "the project database's file")


def check_file(path: Path) -> os.stat_result | None:
    """The checked file's status, or ``None`` if there is none yet (its directory is checked too).

    ``path`` is the database as :func:`canonical` gives it.

    Raises:
        ProjectDatabaseError: A link, not a regular file, another user's,
            writable by group or others, in a directory others may write, or
            beside a sibling that fails the same checks.
    """
    try:
        st: os.stat_result | None = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        st = None
    except OSError as exc:
        raise ProjectDatabaseError(f"cannot read project database {path}: {exc.strerror}") from exc
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise ProjectDatabaseError(
                f"project database {path} is a symbolic link, which is never followed;"
                " fix: give the path of the file itself"
            )
        if stat.S_ISDIR(st.st_mode):
            raise ProjectDatabaseError(f"{path} is not a usable project database: it is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise ProjectDatabaseError(f"{path} is not a usable project database: it is not a regular file")
    elif not path.parent.is_dir():
        return None  # to be made; making it says what is in the way
    check_directory(path.parent)
    if st is not None:
        _check_owned(path, st, "project database")
    for suffix in SIBLING_SUFFIXES:
        _check_sibling(Path(f"{path}{suffix}"))
    return st


def identity(st: os.stat_result) -> Identity:
    """A file's (device, inode)."""
    return st.st_dev, st.st_ino


def verify_opened(conn: sqlite3.Connection, path: Path, checked: Identity) -> None:
    """Make sure ``conn`` opened the file :func:`check_file` passed, and that its siblings pass too.

    Runs the connection's first read, which opens (or plays back) the files
    SQLite keeps beside the database; nothing has been written by the
    executor yet.

    Raises:
        ProjectDatabaseError: SQLite opened another file (the path was swapped
            for a link or another file between the check and the open), or a
            sibling fails its checks.
    """
    replaced = ProjectDatabaseError(
        f"project database {path} was replaced while it was being opened (another file or a link"
        " was swapped in); refusing it: make sure no one else can write its directory"
    )
    # SQLite resolves links itself: the file it opened is the one it names here.
    opened = [str(row[2]) for row in conn.execute("PRAGMA database_list") if row[1] == "main"]
    if opened != [str(path)]:
        raise replaced
    conn.execute("PRAGMA schema_version").fetchone()
    try:
        now = identity(os.lstat(path))
    except OSError:
        raise replaced from None
    if now != checked:
        raise replaced
    check_file(path)  # the siblings the first read made or opened


def _normal(sql: str | None) -> str | None:
    return " ".join(sql.split()) if sql is not None else None


def _objects(conn: sqlite3.Connection) -> Iterator[tuple[str, str, str, str | None]]:
    for kind, name, table, sql in conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_schema"):
        yield str(kind), str(name), str(table), _normal(sql)


def statements(script: str) -> Iterator[str]:
    """The statements of ``script`` one by one, as a migration runs them."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n\t;"):
                yield pending.strip()
            pending = ""
    if pending.strip(" \n\t;"):
        raise ValueError(f"incomplete SQL statement in migration: {pending.strip()[:60]!r}")


@functools.lru_cache(maxsize=16)
def expected_objects(scripts: tuple[str, ...]) -> frozenset[tuple[str, str, str, str | None]]:
    """The schema objects that applying ``scripts`` in order to an empty database makes."""
    conn = sqlite3.connect(":memory:", isolation_level=None)
    try:
        for script in scripts:
            for statement in statements(script):
                conn.execute(statement)
        return frozenset(_objects(conn))
    finally:
        conn.close()


def check_objects(conn: sqlite3.Connection, path: Path, scripts: Iterable[str]) -> None:
    """Refuse a database whose schema is not exactly what ``scripts`` (its migrations so far) make.

    Raises:
        ProjectDatabaseError: An object the schema does not define (a trigger,
            a view, a table or an index), one it defines that is missing, or
            one whose definition was changed; the message names it.
    """
    expected = expected_objects(tuple(scripts))
    found = {obj for obj in _objects(conn) if not (obj[0] == "table" and obj[1] in _STATISTICS)}
    names = {(kind, name) for kind, name, _, _ in expected}
    # Triggers first: they are what would run inside the executor's own transactions.
    order = {"trigger": 0, "view": 1, "table": 2, "index": 3}
    for kind, name, table, _ in sorted(found - expected, key=lambda o: (order.get(o[0], 9), o[1])):
        if (kind, name) in names:
            raise ProjectDatabaseError(
                f"project database {path} has a {kind} {_quote(name)} whose definition is not its"
                " schema's; refusing to use it (it may have been tampered with)"
            )
        on = f" on {_quote(table)}" if kind in ("trigger", "index") else ""
        raise ProjectDatabaseError(
            f"project database {path} holds a {kind} {_quote(name)}{on} that its schema does not define;"
            " refusing to use it (it may have been planted): drop it only if you trust the file"
        )
    for kind, name, _, _ in sorted(expected - found):
        raise ProjectDatabaseError(
            f"project database {path} lacks the {kind} {_quote(name)} of its schema; refusing to use it"
        )


def create_exclusive(path: Path) -> None:
    """Make an empty file at ``path``, mode 0600, never through a link.

    Raises:
        FileExistsError: Something (a link included) is already there.
        OSError: It cannot be made.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    os.close(fd)


__all__ = [
    "SIBLING_SUFFIXES",
    "Identity",
    "canonical",
    "check_directory",
    "check_file",
    "check_objects",
    "create_exclusive",
    "expected_objects",
    "identity",
    "statements",
    "verify_opened",
]
