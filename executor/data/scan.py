"""Which regular files a datasource holds: a scan that never follows a symbolic link.

:func:`scan` lists the datasource's regular files, each as a :class:`FileStamp`
(name, size, mtime) that the selection, the view and the project store all
name files by. The tree is read through descriptors, one directory at a time,
so a directory swapped for a link during the scan is skipped, not followed.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING

from executor.errors import DataSourceError

if TYPE_CHECKING:
    from pathlib import Path

log = logging.getLogger(__name__)

MAX_SCAN_FILES = 1_000_000
"""Regular files a datasource may hold; beyond, the scan fails rather than eat the parent's memory."""
MAX_SCAN_DEPTH = 128
"""Directory nesting a scan follows: one descriptor is held open per level."""

ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
"""How a datasource root is opened: it may be reached through a link (it is the operator's)."""
DIR_FLAGS = ROOT_FLAGS | os.O_NOFOLLOW
"""How a directory under the root is opened: never through a link."""


@dataclass(frozen=True)
class FileStamp:
    """One datasource file as the parent saw it.

    Attributes:
        name: POSIX path relative to the datasource root (no ``..``, no leading ``/``).
        size: Size in bytes.
        mtime_ns: Modification time in nanoseconds.
    """

    name: str
    size: int
    mtime_ns: int


def _is_text(name: str) -> bool:
    """Whether ``name`` is valid Unicode (an undecodable byte becomes a lone surrogate)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scan(data_dir: Path) -> list[FileStamp]:
    """Every regular file under ``data_dir``, sorted by name.

    The tree is read through descriptors: each subdirectory is opened without
    following links, so a directory swapped for a symlink is skipped, not
    followed. Symlinks (to files or directories), FIFOs, sockets and devices
    are skipped, as are entries whose names are not valid UTF-8 (logged).
    ``data_dir`` itself may be reached through a link: it is the operator's.

    Raises:
        DataSourceError: ``data_dir`` or a subdirectory cannot be read, the tree
            nests deeper than :data:`MAX_SCAN_DEPTH`, or holds more than
            :data:`MAX_SCAN_FILES` files.
    """
    try:
        root = os.open(data_dir, ROOT_FLAGS)
    except OSError as exc:
        raise DataSourceError(f"cannot read data directory {data_dir}: {exc.strerror}") from None
    scanner = _Scanner(data_dir)
    try:
        scanner.walk(root, "", 0)
    finally:
        os.close(root)
    if scanner.undecodable:
        log.warning(
            "data directory %s: skipped %d entries whose names are not valid UTF-8, e.g. %r",
            data_dir,
            scanner.undecodable,
            scanner.undecodable_example,
        )
    log.debug(
        "data directory %s: %d files; skipped %d symlinks and %d special files",
        data_dir,
        len(scanner.files),
        scanner.links,
        scanner.special,
    )
    return sorted(scanner.files, key=lambda f: f.name)


class _Scanner:
    """One scan's findings across directories."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.files: list[FileStamp] = []
        self.undecodable = 0
        self.undecodable_example = b""
        self.links = 0
        self.special = 0

    def walk(self, dir_fd: int, prefix: str, depth: int) -> None:
        """Record the files of ``dir_fd`` (named ``prefix``), then walk its subdirectories."""
        if depth > MAX_SCAN_DEPTH:
            raise DataSourceError(
                f"data directory {self.data_dir} nests deeper than {MAX_SCAN_DEPTH} directories"
            )
        where = prefix.rstrip("/") or "."
        subdirs: list[str] = []
        try:
            with os.scandir(dir_fd) as entries:
                for entry in entries:
                    name = entry.name
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # gone since it was listed
                    if stat.S_ISLNK(st.st_mode):
                        self.links += 1
                    elif not _is_text(name):
                        self.undecodable += 1
                        self.undecodable_example = self.undecodable_example or os.fsencode(prefix + name)
                    elif stat.S_ISDIR(st.st_mode):
                        subdirs.append(name)
                    elif stat.S_ISREG(st.st_mode):
                        if len(self.files) >= MAX_SCAN_FILES:
                            raise DataSourceError(
                                f"data directory {self.data_dir} holds more than {MAX_SCAN_FILES} files"
                            )
                        self.files.append(FileStamp(prefix + name, st.st_size, st.st_mtime_ns))
                    else:
                        self.special += 1
        except OSError as exc:
            raise DataSourceError(
                f"cannot read {where!r} in data directory {self.data_dir}: {exc.strerror}"
            ) from None
        for name in sorted(subdirs):
            try:
                fd = os.open(name, DIR_FLAGS, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # gone, or swapped for a file or a link, since it was listed
                raise DataSourceError(
                    f"cannot read {prefix + name!r} in data directory {self.data_dir}: {exc.strerror}"
                ) from None
            try:
                self.walk(fd, f"{prefix}{name}/", depth + 1)
            finally:
                os.close(fd)
