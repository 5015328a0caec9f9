"""The read-only view that shows a sandbox exactly the files of its batch, made without copying them.

For each batch a :class:`DataView` is made in the batch's task directory and
mounted read-only at the sandbox's data path: it holds the batch's files
(:mod:`executor.data.selection`) and nothing else, without copying a byte of
them.

Two ways to make a view, chosen per file:

``hardlink``
    A hard link to the very inode that was checked. Needs the run directory
    (``SANDBOX_EXECUTOR_RUN_DIR``) on the data's filesystem, and as a non-root
    parent under ``fs.protected_hardlinks`` files the parent owns.
``bind``
    An empty read-only placeholder in the view, covered by a read-only bind
    mount of the data file (:meth:`DataView.mounts`). The engine mounts by path,
    so a file swapped for a link between the check and the container's start by
    someone who can write the data directory would be mounted as what it then
    is; the data directory's writers are trusted, the sandbox is not one of them.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from executor import paths
from executor.backends import Mount
from executor.data.filesystem import protected_hardlinks, same_filesystem
from executor.data.scan import DIR_FLAGS, FileStamp
from executor.data.viewpaths import PATH_MAX, ViewPaths, name_parts
from executor.errors import DataSourceError

if TYPE_CHECKING:
    from collections.abc import Sequence
    from types import TracebackType

log = logging.getLogger(__name__)

MAX_BIND_FILES = 1_000
"""Per-file bind mounts one view may need: each is a mount in the container's namespace."""

METHODS = ("auto", "hardlink", "bind")

# What the parent tells from "changed or vanished since the scan" rather than a host failure.
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES})
# A hard link the kernel will not make here, though a bind mount of the file would work.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK})


def _unchanged(st: os.stat_result, stamp: FileStamp) -> bool:
    """Whether ``st`` is a regular file with the size and mtime ``stamp`` recorded."""
    return stat.S_ISREG(st.st_mode) and st.st_size == stamp.size and st.st_mtime_ns == stamp.mtime_ns


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    """``name`` in ``dir_fd`` without following a link, or ``None`` if it is gone."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise


class _Parents:
    """Opens a file's parent directory from the datasource root, one component at a time.

    No component may be a symlink. The last parent stays open: files in name
    order mostly share it.
    """

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self.key: tuple[str, ...] | None = None
        self.fd: int | None = None

    def open(self, dirs: Sequence[str]) -> int | None:
        """A descriptor for ``dirs`` under the root, or ``None`` if it is gone or not a plain directory."""
        key = tuple(dirs)
        if key == self.key:
            return self.fd if self.fd is not None else self.root_fd
        self.close()
        fd = self.root_fd
        try:
            for part in key:
                nxt = os.open(part, DIR_FLAGS, dir_fd=fd)
                if fd != self.root_fd:
                    os.close(fd)
                fd = nxt
        except OSError as exc:
            if fd != self.root_fd:
                os.close(fd)
            if exc.errno in _GONE:
                return None
            raise
        self.key = key
        self.fd = fd if fd != self.root_fd else None
        return fd

    def close(self) -> None:
        """Close the cached parent, if any."""
        if self.fd is not None:
            os.close(self.fd)
        self.key = None
        self.fd = None


class DataView:
    """A directory holding exactly the given datasource files, read-only to the sandbox.

    A context manager; :meth:`remove` is safe twice. ``dest`` (which must not
    exist) is made private, filled, then opened to the sandbox's group:
    directories become ``0o750`` and ``root:gid`` when the parent is root (or
    when a non-root parent may give them to ``gid``), else ``0o755``.
    Hard-linked files keep the data's own inode, owner and mode: the parent
    never changes the operator's files. Placeholders for bind mounts are empty
    ``0o444`` files.

    Each file is checked on the way in: every directory on its path is opened
    without following links, and the file (and, once linked, the link's inode)
    must still be the regular file with the size and mtime the scan recorded.
    A file that changed or vanished is left out and named in :attr:`missing`;
    the view is still made.

    Args:
        dest: Where to make the view: a fresh path inside a task directory.
        data_dir: The datasource root the files were scanned from.
        files: The stamps of the files to show (names unique).
        gid: The sandbox's group.
        method: ``"hardlink"`` (fail if impossible), ``"bind"`` (per-file bind
            mounts only), or ``"auto"``: a hard link per file, a bind mount for a
            file the kernel will not link here (another filesystem, a file a
            non-root parent does not own, too many links).
        existing: ``dest`` is an empty directory already there (a warm slot's,
            mounted into its running sandbox) instead of a fresh path.

    Attributes:
        path: The view (``dest``): the container mounts it read-only at its data path.
        method: ``"hardlink"`` if every file is a hard link, else ``"bind"``:
            :meth:`mounts` then holds one bind mount per bound file.
        files: The stamps of the files in the view, in name order.
        names: The view's file names: all a per-file report may name.
        missing: Names of files left out because they changed or vanished since
            the scan, or (when :func:`~executor.data.selection.select` did not
            already leave them out) have a path too long for the view.

    Raises:
        DataSourceError: The data directory cannot be opened; a file cannot be
            linked with ``method="hardlink"``; more than :data:`MAX_BIND_FILES`
            files need bind mounts; a file to bind-mount has a path the engine's
            bind syntax cannot carry (a ``:``).
        OSError: The host refused to make the view itself (callers turn it into a ``HostError``).
    """

    def __init__(
        self,
        dest: Path,
        data_dir: Path,
        files: Sequence[FileStamp],
        *,
        gid: int,
        method: str = "auto",
        existing: bool = False,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"view method must be one of {', '.join(METHODS)}, not {method!r}")
        ordered = sorted(files, key=lambda f: f.name)
        for f in ordered:
            name_parts(f.name)
        if len({f.name for f in ordered}) != len(ordered):
            raise ValueError("a data view's file names must be unique")
        if method == "bind" and len(ordered) > MAX_BIND_FILES:
            raise DataSourceError(_too_many_binds(len(ordered)))
        self.path = dest
        self.method = "hardlink"
        self.files: tuple[FileStamp, ...] = ()
        self.names: frozenset[str] = frozenset()
        self.missing: frozenset[str] = frozenset()
        self._binds: list[tuple[str, Path]] = []
        self._dirs: list[Path] = [dest]
        self._made_dirs: set[Path] = set()
        if existing:
            # A warm slot's empty directory, mounted before the task was known.
            if any(dest.iterdir()):
                raise ValueError(f"a data view's directory must be empty: {dest}")
            dest.chmod(0o700)
        else:
            dest.mkdir(mode=0o700)  # private until it is complete
        self._made = True
        try:
            self._fill(Path(data_dir), ordered, method)
            self._open_up(gid)
        except BaseException:
            self.remove()
            raise

    def _fill(self, data_dir: Path, files: list[FileStamp], method: str) -> None:
        real_root = Path(os.path.realpath(data_dir))
        try:
            root_fd = os.open(real_root, DIR_FLAGS)
        except OSError as exc:
            raise DataSourceError(f"cannot read data directory {data_dir}: {exc.strerror}") from None
        parents = _Parents(root_fd)
        shown: list[FileStamp] = []
        missing: set[str] = set()
        too_long: set[str] = set()
        try:
            for f in files:
                parts = name_parts(f.name)
                parent_fd = parents.open(parts[:-1])
                leaf = parts[-1]
                st = None if parent_fd is None else _lstat_at(parent_fd, leaf)
                if parent_fd is None or st is None or not _unchanged(st, f):
                    missing.add(f.name)
                    continue
                try:
                    shows = self._show(parent_fd, leaf, st, f, real_root, data_dir, method)
                except OSError as exc:
                    # select() leaves such files out; one that still gets here (a
                    # view deeper than planned) is left out too, never fatal.
                    if exc.errno != errno.ENAMETOOLONG:
                        raise
                    too_long.add(f.name)
                    continue
                if shows:
                    shown.append(f)
                else:
                    missing.add(f.name)
        finally:
            parents.close()
            os.close(root_fd)
        self.files = tuple(shown)
        self.names = frozenset(f.name for f in shown)
        self.missing = frozenset(missing | too_long)
        self.method = "bind" if self._binds else "hardlink"
        if missing:
            log.warning(
                "data view: %d files changed or vanished since the scan and are left out, e.g. %r",
                len(missing),
                min(missing),
            )
        if too_long:
            log.warning(
                "data view: %d files have a path too long for the view and are left out, e.g. %r",
                len(too_long),
                min(too_long)[:200],
            )

    def _show(
        self,
        parent_fd: int,
        leaf: str,
        st: os.stat_result,
        stamp: FileStamp,
        real_root: Path,
        data_dir: Path,
        method: str,
    ) -> bool:
        """Put one checked file in the view; ``False`` if it changed meanwhile (left out).

        Raises:
            OSError: ENAMETOOLONG before anything is made for a name the view
                cannot hold (so no directory of it shows either).
        """
        if ViewPaths((str(self.path),)).reason(stamp.name) is not None:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), stamp.name[:200])
        parts = stamp.name.split("/")
        self._make_dirs(parts[:-1])
        dst = self.path / stamp.name
        if method != "bind":
            linked = self._link(parent_fd, leaf, dst, st, stamp, data_dir, strict=method == "hardlink")
            if linked is not None:
                return linked
        self._bind(real_root, stamp, dst)
        return True

    def _make_dirs(self, dirs: Sequence[str]) -> None:
        """The view's directories down to ``dirs``, made private (opened up at the end)."""
        path = self.path
        for part in dirs:
            path = path / part
            if path not in self._made_dirs:
                path.mkdir(mode=0o700)
                self._made_dirs.add(path)
                self._dirs.append(path)

    def _link(
        self,
        parent_fd: int,
        leaf: str,
        dst: Path,
        st: os.stat_result,
        stamp: FileStamp,
        data_dir: Path,
        *,
        strict: bool,
    ) -> bool | None:
        """Hard-link ``leaf`` to ``dst``: True if linked and verified, False if gone, None to bind."""
        try:
            # Without following: a symlink swapped in is linked as a symlink, then refused below.
            os.link(leaf, dst, src_dir_fd=parent_fd, follow_symlinks=False)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            if exc.errno in _NO_LINK:
                if strict:
                    raise DataSourceError(
                        f"cannot hard-link {stamp.name!r} from data directory {data_dir} into the data "
                        f"view: {exc.strerror}; put the run directory ({paths.ENV_RUN_DIR}) on the data's "
                        f"filesystem, or let the view use bind mounts"
                    ) from None
                return None
            raise
        got = os.lstat(dst)
        if (got.st_dev, got.st_ino) != (st.st_dev, st.st_ino) or not _unchanged(got, stamp):
            os.unlink(dst)  # someone else's file, or this one changed: never show it
            return False
        return True

    def _bind(self, real_root: Path, stamp: FileStamp, dst: Path) -> None:
        """An empty read-only placeholder at ``dst`` for a bind mount of the data file."""
        if len(self._binds) >= MAX_BIND_FILES:
            raise DataSourceError(_too_many_binds(None))
        source = real_root / stamp.name
        if len(os.fsencode(source)) >= PATH_MAX:  # the engine could not mount it
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(source))
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o444)
        try:
            os.fchmod(fd, 0o444)  # whatever the umask
        finally:
            os.close(fd)
        self._binds.append((stamp.name, source))

    def _open_up(self, gid: int) -> None:
        """Hand the view's directories to the sandbox's group (or to all), read and search only."""
        if os.geteuid() == 0:
            owner, grouped = 0, True
        else:
            owner, grouped = -1, True
            try:
                os.chown(self.path, -1, gid)  # works if this user is in the sandbox's group
            except OSError:
                grouped = False
        mode = 0o750 if grouped else 0o755
        # Deepest first, so the view is complete before its top opens.
        for d in reversed(self._dirs):
            if grouped:
                os.chown(d, owner, gid, follow_symlinks=False)
            os.chmod(d, mode)  # ours, made above: never a link

    def mounts(self, target: str) -> list[Mount]:
        """What to mount at ``target``: the view, then each bound file over its placeholder; all read-only."""
        base = target.rstrip("/")
        return [
            Mount(self.path, target, read_only=True),
            *(Mount(source, f"{base}/{name}", read_only=True) for name, source in self._binds),
        ]

    def remove(self) -> None:
        """Delete the view; never touches the data (a hard link's removal only drops a link)."""
        if getattr(self, "_made", False) and os.path.lexists(self.path):
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> DataView:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


def _too_many_binds(count: int | None) -> str:
    """The one-line error for a view that needs more than :data:`MAX_BIND_FILES` bind mounts."""
    how_many = f"{count} files" if count is not None else f"more than {MAX_BIND_FILES} files"
    return (
        f"the data view needs a read-only bind mount for each of {how_many}, over the limit of "
        f"{MAX_BIND_FILES} per batch: put the run directory ({paths.ENV_RUN_DIR}) on the data's filesystem "
        f"so hard links work, or use a smaller --batch-size"
    )


def check_view_budget(run_dir: Path, data_dir: Path, method: str, largest_batch: int) -> None:
    """Refuse, before anything starts, a plan whose views would need too many bind mounts.

    Views need bind mounts when asked to (``method="bind"``) or, with
    ``"auto"``, when the run directory and the data are on different
    filesystems, so that hard links cannot be made.

    Raises:
        DataSourceError: A batch of ``largest_batch`` files would need more
            than :data:`MAX_BIND_FILES` bind mounts.
    """
    if largest_batch <= MAX_BIND_FILES or method == "hardlink":
        return
    if method == "bind" or not same_filesystem(run_dir, data_dir):
        raise DataSourceError(_too_many_binds(largest_batch))


def view_method(run_dir: Path, data_dir: Path | None = None) -> str:
    """How data views will be made, in words for ``doctor``.

    Cheap: compares the filesystems of ``run_dir`` (or its nearest existing
    ancestor) and ``data_dir``. Two bind mounts of one filesystem share a
    device yet cannot be linked across; views then fall back to bind mounts
    by themselves.
    """
    bind = f"read-only bind mounts per file (at most {MAX_BIND_FILES} per batch)"
    if data_dir is None:
        return f"hard links where the data shares a filesystem with the run directory {run_dir}, else {bind}"
    try:
        shared = same_filesystem(run_dir, data_dir)
    except OSError as exc:
        return f"unknown: cannot read data directory {data_dir}: {exc.strerror}"
    if not shared:
        return (
            f"{bind}: the run directory {run_dir} and the data {data_dir} are on different filesystems; "
            f"set {paths.ENV_RUN_DIR} to a directory on the data's filesystem to use hard links"
        )
    text = "hard links (run directory and data on one filesystem)"
    if os.geteuid() != 0 and protected_hardlinks():
        text += "; files owned by another user are bind-mounted instead (fs.protected_hardlinks)"
    return text
