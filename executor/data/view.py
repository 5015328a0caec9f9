"""Which datasource files a task may see, and the read-only view that shows it only those.

The trusted parent decides; the sandbox never does. :func:`scan` lists the
datasource's regular files (never following a symlink), :func:`select` applies
the task's flags against what the project database remembers, and
:func:`plan_batches` splits the selection. For each batch a :class:`DataView`
is made in the batch's task directory and mounted read-only at the sandbox's
data path: it holds the batch's files and nothing else, without copying a byte
of them.

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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType

from executor import paths
from executor.backends import Mount
from executor.errors import DataSourceError

log = logging.getLogger(__name__)

MAX_SCAN_FILES = 1_000_000
"""Regular files a datasource may hold; beyond, the scan fails rather than eat the parent's memory."""
MAX_SCAN_DEPTH = 128
"""Directory nesting a scan follows: one descriptor is held open per level."""
MAX_BIND_FILES = 1_000
"""Per-file bind mounts one view may need: each is a mount in the container's namespace."""
PATH_MAX = 4096
"""Bytes of a path the kernel takes, its terminating NUL included (Linux): a longer one is ENAMETOOLONG."""
NAME_MAX = 255
"""Bytes of one name component on Linux's filesystems (ext4, tmpfs, overlayfs)."""
TEST_RUN_MAX_FILES = 1
"""Files a test run sees: the seed SDK's ``test_run_number_of_files`` setting defaults to 1.

(bitfount's ``config.settings.test_run_number_of_files``, "the number of files
part of a test run", ``Field(default=1, gt=0)``.)
"""

METHODS = ("auto", "hardlink", "bind")

_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_DIR_FLAGS = _ROOT_FLAGS | os.O_NOFOLLOW
# What the parent tells from "changed or vanished since the scan" rather than a host failure.
_GONE = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EACCES})
# A hard link the kernel will not make here, though a bind mount of the file would work.
_NO_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EMLINK})


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


def _parts(name: str) -> list[str]:
    """The components of a datasource-relative name; ``ValueError`` if it could leave the root."""
    parts = name.split("/")
    if not name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a datasource-relative file name: {name!r}")
    return parts


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
        root = os.open(data_dir, _ROOT_FLAGS)
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
                fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
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


@dataclass(frozen=True)
class Selection:
    """The files a task may see, and why the others were left out.

    ``total`` always equals the selected files plus the four skipped counts.

    Attributes:
        files: What the task may see, in name order.
        total: Files in the datasource.
        skipped_processed: Unchanged since this task hash processed them (new data only).
        skipped_failed: Failed before under this task hash (unless forced to rerun).
        over_limit: Cut by the test run, ``max_files`` or ``max_batches``.
        skipped_unusable: Files no data view can show: a path too long for it
            (see :class:`ViewPaths`).
    """

    files: tuple[FileStamp, ...]
    total: int
    skipped_processed: int = 0
    skipped_failed: int = 0
    over_limit: int = 0
    skipped_unusable: int = 0

    def __post_init__(self) -> None:
        skipped = self.skipped_processed + self.skipped_failed + self.over_limit + self.skipped_unusable
        if self.total != len(self.files) + skipped:
            raise ValueError(f"selection counts do not add up to its total: {self.counts()}")

    def counts(self) -> dict[str, int]:
        """The counts by name: ``total``, ``selected`` and the four skipped counts."""
        return {
            "total": self.total,
            "selected": len(self.files),
            "skipped_processed": self.skipped_processed,
            "skipped_failed": self.skipped_failed,
            "over_limit": self.over_limit,
            "skipped_unusable": self.skipped_unusable,
        }


@dataclass(frozen=True)
class ViewPaths:
    """The directories a file's path is made under when a data view shows it; each must leave room.

    A file shows in a view as ``<view>/<name>`` on the host and
    ``<sandbox data path>/<name>`` inside, and a bind-mounted one is mounted
    from ``<datasource>/<name>``; each such path must be shorter than
    :data:`PATH_MAX` bytes, and no component of ``name`` longer than
    :data:`NAME_MAX`. One file deep or long enough to break that would fail
    the making of every view it is in, so :func:`select` leaves it out and
    counts it ``skipped_unusable`` instead.

    Attributes:
        roots: The directories (as the parent passes them to the kernel or the engine).
    """

    roots: tuple[str, ...]

    @classmethod
    def of(
        cls, run_dir: Path, data_dir: Path, method: str, sandbox_data: str, *, view_dir: Path
    ) -> ViewPaths:
        """The roots of ``data_dir``'s views made in ``run_dir`` by ``method``, shown at ``sandbox_data``.

        ``view_dir`` is a host path as long as any view's in ``run_dir`` (the
        task directory names it: :func:`executor.task.taskdir.data_view_path`).

        The datasource counts only when views will be bind mounts; a file
        that unexpectedly needs one anyway is left out of its view then.
        """
        roots = [str(view_dir), sandbox_data]
        if method == "bind" or (method == "auto" and not may_link(run_dir, data_dir)):
            roots.append(os.path.realpath(data_dir))
        return cls(tuple(roots))

    def reason(self, name: str) -> str | None:
        """Why no view can show datasource file ``name``, or ``None`` if one can."""
        raw = os.fsencode(name)
        longest = max(len(part) for part in raw.split(b"/"))
        if longest > NAME_MAX:
            return f"a component of its name is {longest} bytes, over the {NAME_MAX} a name may have"
        for root in self.roots:
            size = len(os.fsencode(root.rstrip("/"))) + 1 + len(raw)
            if size >= PATH_MAX:
                return f"its path under {root} would be {size} bytes, over the {PATH_MAX - 1} a path may have"
        return None


def effective_max_files(test_run: bool, max_files: int) -> int | None:
    """The file cap of a task: ``max_files`` (0: none), at most :data:`TEST_RUN_MAX_FILES` in a test run."""
    if max_files < 0:
        raise ValueError(f"max_files must be 0 (no limit) or more, not {max_files}")
    limit = max_files or None
    if test_run:
        return TEST_RUN_MAX_FILES if limit is None else min(limit, TEST_RUN_MAX_FILES)
    return limit


def select(
    files: Iterable[FileStamp],
    *,
    processed: Mapping[str, tuple[int, int]],
    failed: Mapping[str, tuple[int, int]],
    new_data_only: bool,
    force_rerun_failed: bool,
    max_files: int | None,
    view_paths: ViewPaths | None = None,
) -> Selection:
    """Choose what a task may see from the datasource's ``files``.

    In name order, a file is:

    - skipped as unusable if ``view_paths`` says no view can show it (its
      path would be too long there); the count is logged with an example;
    - else skipped as failed if ``failed`` holds its exact ``(size, mtime_ns)`` (it
      failed and has not changed since), unless ``force_rerun_failed`` (a forced
      rerun selects it even when it is also unchanged); a failed file that
      changed is new data;
    - else, with ``new_data_only``, skipped as processed if ``processed`` holds its
      exact ``(size, mtime_ns)``: a changed or new file is selected;
    - else selected, until ``max_files`` (``None`` or 0: no limit) are; the rest
      are over the limit.
    """
    if max_files is not None and max_files < 0:
        raise ValueError(f"max_files must be None, 0 (no limit) or more, not {max_files}")
    chosen: list[FileStamp] = []
    total = skipped_processed = skipped_failed = over_limit = 0
    unusable: list[tuple[str, str]] = []
    for f in sorted(files, key=lambda f: f.name):
        total += 1
        reason = view_paths.reason(f.name) if view_paths is not None else None
        if reason is not None:
            unusable.append((f.name, reason))
            continue
        if failed.get(f.name) == (f.size, f.mtime_ns):
            if not force_rerun_failed:
                skipped_failed += 1
                continue
        elif new_data_only and processed.get(f.name) == (f.size, f.mtime_ns):
            skipped_processed += 1
            continue
        if max_files and len(chosen) >= max_files:
            over_limit += 1
        else:
            chosen.append(f)
    if unusable:
        name, reason = unusable[0]
        log.warning(
            "%d datasource file(s) skipped: no data view can show them; e.g. %r: %s",
            len(unusable),
            name[:200] + ("..." if len(name) > 200 else ""),
            reason,
        )
    return Selection(tuple(chosen), total, skipped_processed, skipped_failed, over_limit, len(unusable))


def plan_batches(
    selection: Selection, batch_size: int, max_batches: int
) -> tuple[list[tuple[FileStamp, ...]], Selection]:
    """Split ``selection`` into batches of ``batch_size`` files (0: one batch of all).

    There is always at least one batch: an empty selection gives one empty
    batch, so that the protocol still runs and reports on no data. With
    ``max_batches`` (0: no limit) the batches beyond it are dropped and their
    files counted over the limit in the selection returned with the batches.
    """
    if batch_size < 0 or max_batches < 0:
        raise ValueError(f"batch_size and max_batches must be 0 or more, not {batch_size}, {max_batches}")
    files = selection.files
    if batch_size == 0 or not files:
        batches = [files]
    else:
        batches = [files[i : i + batch_size] for i in range(0, len(files), batch_size)]
    if max_batches and len(batches) > max_batches:
        batches = batches[:max_batches]
        kept = tuple(f for batch in batches for f in batch)
        selection = replace(selection, files=kept, over_limit=selection.over_limit + len(files) - len(kept))
    return batches, selection


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
                nxt = os.open(part, _DIR_FLAGS, dir_fd=fd)
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
            the scan, or (when :func:`select` did not already leave them out)
            have a path too long for the view.

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
            _parts(f.name)
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
            root_fd = os.open(real_root, _DIR_FLAGS)
        except OSError as exc:
            raise DataSourceError(f"cannot read data directory {data_dir}: {exc.strerror}") from None
        parents = _Parents(root_fd)
        shown: list[FileStamp] = []
        missing: set[str] = set()
        too_long: set[str] = set()
        try:
            for f in files:
                parts = _parts(f.name)
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


def _device(path: Path) -> int:
    """The filesystem of ``path`` or its nearest existing ancestor (the run directory may not exist yet)."""
    for p in (path, *path.parents):
        try:
            return os.stat(p).st_dev
        except OSError:
            continue
    return os.stat("/").st_dev


def may_link(run_dir: Path, data_dir: Path) -> bool:
    """Whether views of ``data_dir`` can be hard links in ``run_dir`` (one filesystem).

    Cheap and optimistic: a file the kernel still refuses to link (another
    user's, under ``fs.protected_hardlinks``) shows only when the view is made.
    """
    try:
        return os.stat(data_dir).st_dev == _device(run_dir)
    except OSError:
        return False


def _protected_hardlinks() -> bool:
    try:
        return Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"
    except OSError:
        return False


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
    if method == "bind" or os.stat(data_dir).st_dev != _device(run_dir):
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
        data_dev = os.stat(data_dir).st_dev
    except OSError as exc:
        return f"unknown: cannot read data directory {data_dir}: {exc.strerror}"
    if data_dev != _device(run_dir):
        return (
            f"{bind}: the run directory {run_dir} and the data {data_dir} are on different filesystems; "
            f"set {paths.ENV_RUN_DIR} to a directory on the data's filesystem to use hard links"
        )
    text = "hard links (run directory and data on one filesystem)"
    if os.geteuid() != 0 and _protected_hardlinks():
        text += "; files owned by another user are bind-mounted instead (fs.protected_hardlinks)"
    return text
