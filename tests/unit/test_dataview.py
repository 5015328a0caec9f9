"""Data selection and data views: the parent decides what the sandbox sees, read-only, uncopied."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import pickle
import shutil
import stat
import tempfile
import traceback
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from executor.backends import Mount
from executor.data import filesystem
from executor.data import scan as datascan
from executor.data import view as dataview
from executor.data.scan import FileStamp, scan
from executor.data.selection import TEST_RUN_MAX_FILES, Selection, effective_max_files, plan_batches, select
from executor.data.view import MAX_BIND_FILES, DataView, check_view_budget, view_method
from executor.data.viewpaths import NAME_MAX, PATH_MAX, ViewPaths
from executor.errors import DataSourceError
from executor.task.taskdir import data_view_path
from tests.deeptree import deep_file

GID = 10_001
NOBODY = 65_534
IS_ROOT = os.geteuid() == 0


def _write(root: Path, name: str, content: str = "x") -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def _names(files: list[FileStamp] | tuple[FileStamp, ...]) -> list[str]:
    return [f.name for f in files]


def _tree(root: Path) -> set[str]:
    """Every file and symlink under ``root``, as relative names (directories implied)."""
    found = set()
    for dirpath, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]:
            found.add(os.path.relpath(os.path.join(dirpath, name), root))
    return found


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    path = tmp_path / "run"
    path.mkdir()
    return path


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory in /tmp that another user can reach, removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="se-dv-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    for dirpath, dirs, _ in os.walk(path):
        for d in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(dirpath, d), 0o700)
    shutil.rmtree(path, ignore_errors=True)


def _as_unprivileged(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` as a non-root user: directly if we are not root, else in a child as nobody."""
    if not IS_ROOT:
        return fn()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (the child)
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            payload = pickle.dumps(("ok", fn()))
        except BaseException as exc:
            payload = pickle.dumps(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        with os.fdopen(write, "wb") as f:
            f.write(payload)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        payload = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(payload)
    if kind == "error":
        raise AssertionError(f"in the unprivileged child: {value}")
    return value


# -- scan ---------------------------------------------------------------------------------------


def test_scan_lists_regular_files_sorted_with_size_and_mtime(data: Path) -> None:
    _write(data, "b.csv", "12345")
    _write(data, "a.csv", "1")
    _write(data, "sub/deeper/c.csv", "123")
    _write(data, "a.txt")
    os.utime(data / "b.csv", ns=(1_000_000_123, 2_000_000_456))

    files = scan(data)

    assert _names(files) == ["a.csv", "a.txt", "b.csv", "sub/deeper/c.csv"]
    b = files[2]
    assert (b.size, b.mtime_ns) == (5, 2_000_000_456)
    assert files[3].size == 3


def test_scan_never_follows_or_lists_symlinks_fifos_or_dangling_links(data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _write(outside, "secret.csv", "patient data the task may not see")
    _write(data, "real.csv")
    (data / "to_file.csv").symlink_to(outside / "secret.csv")
    (data / "to_dir").symlink_to(outside, target_is_directory=True)
    (data / "dangling.csv").symlink_to(tmp_path / "nowhere")
    (data / "sub").mkdir()
    (data / "sub" / "up").symlink_to(data, target_is_directory=True)
    os.mkfifo(data / "pipe.csv")

    assert _names(scan(data)) == ["real.csv"]


def test_scan_does_not_follow_a_directory_swapped_for_a_symlink_while_it_runs(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    _write(outside, "secret.csv")
    _write(data, "sub/x.csv")
    _write(data, "top.csv")
    real_scandir = os.scandir

    def scandir_then_swap(fd: int) -> contextlib.nullcontext[list[os.DirEntry[str]]]:
        with real_scandir(fd) as it:
            entries = list(it)
        for entry in entries:
            entry.stat(follow_symlinks=False)  # as listed: "sub" is a directory
        if not (data / "sub").is_symlink():
            os.rename(data / "sub", tmp_path / "moved-away")
            (data / "sub").symlink_to(outside, target_is_directory=True)
        return contextlib.nullcontext(entries)

    monkeypatch.setattr(os, "scandir", scandir_then_swap)
    assert _names(scan(data)) == ["top.csv"]


def test_scan_skips_names_that_are_not_utf8_and_says_so(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    _write(data, "good.csv")
    with open(os.path.join(os.fsencode(data), b"bad-\xff.csv"), "w") as f:
        f.write("x")
    os.mkdir(os.path.join(os.fsencode(data), b"dir-\xfe"))
    _write(Path(os.fsdecode(os.path.join(os.fsencode(data), b"dir-\xfe"))), "inner.csv")

    with caplog.at_level(logging.WARNING, logger="executor.data.scan"):
        files = scan(data)

    assert _names(files) == ["good.csv"]
    assert "skipped 2 entries whose names are not valid UTF-8" in caplog.text


def test_scan_keeps_other_unicode_names(data: Path) -> None:
    _write(data, "ärzte/bericht ü 1.csv")
    assert _names(scan(data)) == ["ärzte/bericht ü 1.csv"]


def test_scan_of_a_missing_directory_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="cannot read data directory") as info:
        scan(tmp_path / "absent")
    assert "\n" not in str(info.value)


def test_scan_caps_the_number_of_files(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datascan, "MAX_SCAN_FILES", 3)
    for i in range(3):
        _write(data, f"sub/{i}.csv")
    assert len(scan(data)) == 3
    _write(data, "one-more.csv")
    with pytest.raises(DataSourceError, match="holds more than 3 files"):
        scan(data)


def test_scan_caps_the_depth(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datascan, "MAX_SCAN_DEPTH", 2)
    _write(data, "a/b/ok.csv")
    assert _names(scan(data)) == ["a/b/ok.csv"]
    _write(data, "a/b/c/deep.csv")
    with pytest.raises(DataSourceError, match="nests deeper than 2"):
        scan(data)


def test_scan_names_an_unreadable_subdirectory(shared_tmp: Path) -> None:
    data = shared_tmp / "data"
    _write(data, "ok.csv")
    _write(data, "closed/hidden.csv")
    (data / "closed").chmod(0o700)  # owned by us (root: not by nobody); the scanning user cannot enter

    def attempt() -> str:
        try:
            scan(data)
        except DataSourceError as exc:
            return str(exc)
        return "no error"

    if not IS_ROOT:
        (data / "closed").chmod(0o000)
    try:
        message = _as_unprivileged(attempt)
    finally:
        (data / "closed").chmod(0o700)
    assert "'closed'" in message
    assert str(data) in message
    assert "\n" not in message


# -- select -------------------------------------------------------------------------------------

# a: processed, unchanged      b: processed, mtime changed    c: processed, size changed
# d: new                       e: failed (and also unchanged) f: failed, never processed
FILES = [
    FileStamp("a", 1, 100),
    FileStamp("b", 2, 201),
    FileStamp("c", 4, 300),
    FileStamp("d", 4, 400),
    FileStamp("e", 5, 500),
    FileStamp("f", 6, 600),
]
PROCESSED = {"a": (1, 100), "b": (2, 200), "c": (3, 300), "e": (5, 500)}
FAILED = {"e": (5, 500), "f": (6, 600)}  # as they were when they failed: unchanged since


@pytest.mark.parametrize(
    ("new_data_only", "force", "selected", "skipped_processed", "skipped_failed"),
    [
        (False, False, "abcd", 0, 2),
        (False, True, "abcdef", 0, 0),
        (True, False, "bcd", 1, 2),
        (True, True, "bcdef", 1, 0),  # a forced rerun selects e although it is unchanged
    ],
)
@pytest.mark.parametrize("max_files", [None, 0, 2])
def test_select_for_every_flag_combination(
    new_data_only: bool,
    force: bool,
    selected: str,
    skipped_processed: int,
    skipped_failed: int,
    max_files: int | None,
) -> None:
    selection = select(
        reversed(FILES),
        processed=PROCESSED,
        failed=FAILED,
        new_data_only=new_data_only,
        force_rerun_failed=force,
        max_files=max_files,
    )
    kept = selected[:max_files] if max_files else selected
    assert "".join(_names(selection.files)) == kept
    assert selection.counts() == {
        "total": 6,
        "selected": len(kept),
        "skipped_processed": skipped_processed,
        "skipped_failed": skipped_failed,
        "over_limit": len(selected) - len(kept),
        "skipped_unusable": 0,
    }


@pytest.mark.parametrize("state", ["processed", "failed"])
def test_select_reselects_a_file_whose_size_or_mtime_changed(state: str) -> None:
    # A processed file that changed is new data; so is a failed one (say, fixed).
    states: dict[str, Mapping[str, tuple[int, int]]] = {"processed": {}, "failed": {}}
    states[state] = {"x": (10, 1000)}

    def chosen(stamp: FileStamp) -> bool:
        sel = select(
            [stamp],
            processed=states["processed"],
            failed=states["failed"],
            new_data_only=True,
            force_rerun_failed=False,
            max_files=None,
        )
        return bool(sel.files)

    assert not chosen(FileStamp("x", 10, 1000))
    assert chosen(FileStamp("x", 10, 1001))
    assert chosen(FileStamp("x", 11, 1000))
    assert chosen(FileStamp("y", 10, 1000))


def test_select_ignores_processed_files_without_new_data_only() -> None:
    sel = select(
        FILES, processed=PROCESSED, failed={}, new_data_only=False, force_rerun_failed=False, max_files=None
    )
    assert len(sel.files) == 6


def test_select_refuses_a_negative_cap() -> None:
    with pytest.raises(ValueError, match="max_files"):
        select(FILES, processed={}, failed={}, new_data_only=False, force_rerun_failed=False, max_files=-1)


def test_selection_counts_must_add_up() -> None:
    with pytest.raises(ValueError, match="do not add up"):
        Selection(files=(FILES[0],), total=3, skipped_failed=1)


@pytest.mark.parametrize(
    ("test_run", "max_files", "expected"),
    [
        (False, 0, None),
        (False, 5, 5),
        (True, 0, TEST_RUN_MAX_FILES),
        (True, 5, min(5, TEST_RUN_MAX_FILES)),
    ],
)
def test_effective_max_files(test_run: bool, max_files: int, expected: int | None) -> None:
    assert effective_max_files(test_run, max_files) == expected


def test_a_test_run_sees_one_file_like_the_seed() -> None:
    assert TEST_RUN_MAX_FILES == 1
    with pytest.raises(ValueError):
        effective_max_files(False, -1)


# -- plan_batches -------------------------------------------------------------------------------


def _selection(n: int, over: int = 0) -> Selection:
    files = tuple(FileStamp(f"f{i:02d}", i, i) for i in range(n))
    return Selection(files, total=n + over + 1, skipped_processed=1, over_limit=over)


def test_batch_size_zero_is_one_batch_of_everything() -> None:
    sel = _selection(5)
    batches, after = plan_batches(sel, 0, 0)
    assert batches == [sel.files]
    assert after == sel


def test_batches_split_in_name_order() -> None:
    sel = _selection(5)
    batches, after = plan_batches(sel, 2, 0)
    assert [_names(b) for b in batches] == [["f00", "f01"], ["f02", "f03"], ["f04"]]
    assert after == sel


def test_max_batches_moves_the_rest_over_the_limit() -> None:
    sel = _selection(5, over=2)
    batches, after = plan_batches(sel, 2, 2)
    assert len(batches) == 2
    assert after.files == sel.files[:4]
    assert after.counts() == {
        "total": 8,
        "selected": 4,
        "skipped_processed": 1,
        "skipped_failed": 0,
        "over_limit": 3,
        "skipped_unusable": 0,
    }
    batches, after = plan_batches(sel, 2, 3)
    assert after == sel


@pytest.mark.parametrize("batch_size", [0, 3])
def test_an_empty_selection_is_one_empty_batch(batch_size: int) -> None:
    sel = _selection(0)
    assert plan_batches(sel, batch_size, 1) == ([()], sel)


def test_negative_batch_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        plan_batches(_selection(2), -1, 0)
    with pytest.raises(ValueError):
        plan_batches(_selection(2), 1, -1)


# -- DataView -----------------------------------------------------------------------------------


def _snapshot(path: Path) -> tuple[bytes, int, int, int, int, int]:
    st = path.lstat()
    return (path.read_bytes(), st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid, st.st_nlink)


def test_view_holds_hard_links_to_exactly_the_selected_files(data: Path, run_dir: Path) -> None:
    for name in ("a.csv", "b.csv", "sub/c.csv", "sub/d.csv", "other/e.csv"):
        _write(data, name, name)
    (data / "sub" / "c.csv").chmod(0o640)
    before = {p: _snapshot(p) for p in data.rglob("*") if p.is_file()}
    chosen = [f for f in scan(data) if f.name in {"a.csv", "sub/c.csv"}]

    with DataView(run_dir / "view", data, chosen, gid=GID) as view:
        assert view.path == run_dir / "view"
        assert view.method == "hardlink"
        assert view.names == {"a.csv", "sub/c.csv"}
        assert view.files == tuple(chosen)
        assert view.missing == frozenset()
        assert _tree(view.path) == {"a.csv", "sub/c.csv"}
        for name in view.names:
            src, dst = (data / name).lstat(), (view.path / name).lstat()
            assert (dst.st_ino, dst.st_dev) == (src.st_ino, src.st_dev)
            assert src.st_nlink == 2
            assert stat.S_IMODE(dst.st_mode) == stat.S_IMODE(src.st_mode)  # the data's own mode
        assert view.mounts("/data") == [Mount(view.path, "/data", read_only=True)]

    assert not (run_dir / "view").exists()
    after = {p: _snapshot(p) for p in data.rglob("*") if p.is_file()}
    assert after == before  # content, mode, mtime, owner, link count 1 again


@pytest.mark.skipif(not IS_ROOT, reason="handing the view to the sandbox's group as root")
def test_view_directories_belong_to_root_and_the_sandbox_group(data: Path, run_dir: Path) -> None:
    _write(data, "sub/c.csv")
    with DataView(run_dir / "view", data, scan(data), gid=GID) as view:
        for d in (view.path, view.path / "sub"):
            st = d.lstat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, GID)


def test_a_file_swapped_for_a_symlink_after_the_scan_is_not_in_the_view(
    data: Path, run_dir: Path, tmp_path: Path
) -> None:
    _write(data, "ok.csv", "fine")
    _write(data, "swapped.csv", "same size")
    secret = _write(tmp_path, "secret.csv", "same size")
    files = scan(data)
    st = (data / "swapped.csv").stat()
    (data / "swapped.csv").unlink()
    (data / "swapped.csv").symlink_to(secret)
    os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)  # same size and mtime

    with DataView(run_dir / "view", data, files, gid=GID) as view:
        assert view.names == {"ok.csv"}
        assert view.missing == {"swapped.csv"}
        assert _tree(view.path) == {"ok.csv"}
    assert secret.stat().st_nlink == 1


def test_a_directory_swapped_for_a_symlink_after_the_scan_is_not_followed(
    data: Path, run_dir: Path, tmp_path: Path
) -> None:
    _write(data, "sub/x.csv", "x")
    files = scan(data)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.replace(data / "sub" / "x.csv", outside / "x.csv")  # the same inode, size and mtime
    (data / "sub").rmdir()
    (data / "sub").symlink_to(outside, target_is_directory=True)

    with DataView(run_dir / "view", data, files, gid=GID) as view:
        assert view.names == frozenset()
        assert view.missing == {"sub/x.csv"}
        assert _tree(view.path) == set()


def test_changed_and_vanished_files_are_reported_missing_not_fatal(data: Path, run_dir: Path) -> None:
    for name in ("grew.csv", "touched.csv", "gone.csv", "kept.csv", "replaced.csv"):
        _write(data, name, "abc")
    files = scan(data)
    _write(data, "grew.csv", "abcd")
    st = (data / "touched.csv").stat()
    os.utime(data / "touched.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    (data / "gone.csv").unlink()
    (data / "replaced.csv").unlink()
    os.mkfifo(data / "replaced.csv")

    with DataView(run_dir / "view", data, files, gid=GID) as view:
        assert view.names == {"kept.csv"}
        assert view.missing == {"grew.csv", "touched.csv", "gone.csv", "replaced.csv"}
        assert _tree(view.path) == {"kept.csv"}


def test_bind_method_gives_placeholders_and_one_read_only_mount_per_file(data: Path, run_dir: Path) -> None:
    _write(data, "a.csv", "aaa")
    _write(data, "sub/b.csv", "bb")
    _write(data, "not-chosen.csv")
    chosen = [f for f in scan(data) if f.name != "not-chosen.csv"]

    with DataView(run_dir / "view", data, chosen, gid=GID, method="bind") as view:
        assert view.method == "bind"
        assert view.names == {"a.csv", "sub/b.csv"}
        assert _tree(view.path) == {"a.csv", "sub/b.csv"}
        for name in view.names:
            placeholder = (view.path / name).lstat()
            assert stat.S_ISREG(placeholder.st_mode)
            assert placeholder.st_size == 0
            assert stat.S_IMODE(placeholder.st_mode) == 0o444
            assert placeholder.st_ino != (data / name).lstat().st_ino
        real = data.resolve()
        assert view.mounts("/data") == [
            Mount(view.path, "/data", read_only=True),
            Mount(real / "a.csv", "/data/a.csv", read_only=True),
            Mount(real / "sub/b.csv", "/data/sub/b.csv", read_only=True),
        ]
    assert not (run_dir / "view").exists()
    assert (data / "a.csv").read_text() == "aaa"
    assert (data / "a.csv").stat().st_nlink == 1


def test_bind_mounts_point_at_the_data_through_no_link(data: Path, run_dir: Path, tmp_path: Path) -> None:
    _write(data, "a.csv")
    via_link = tmp_path / "via-link"
    via_link.symlink_to(data, target_is_directory=True)
    with DataView(run_dir / "view", via_link, scan(via_link), gid=GID, method="bind") as view:
        assert view.mounts("/data")[1].source == data.resolve() / "a.csv"


def test_too_many_bind_mounts_is_a_one_line_error(
    data: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataview, "MAX_BIND_FILES", 2)
    for i in range(3):
        _write(data, f"{i}.csv")
    with pytest.raises(DataSourceError) as info:
        DataView(run_dir / "view", data, scan(data), gid=GID, method="bind")
    message = str(info.value)
    assert "SANDBOX_EXECUTOR_RUN_DIR" in message
    assert "--batch-size" in message
    assert "\n" not in message
    assert not (run_dir / "view").exists()


def test_the_bind_limit_is_a_thousand_per_batch() -> None:
    assert MAX_BIND_FILES == 1000


def _other_filesystem(tmp_path: Path) -> Path | None:
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK) and shm.stat().st_dev != tmp_path.stat().st_dev:
        return shm
    return None


@pytest.fixture
def data_elsewhere(tmp_path: Path) -> Iterator[Path]:
    """A data directory on another filesystem than ``tmp_path`` (skips if there is none)."""
    other = _other_filesystem(tmp_path)
    if other is None:
        pytest.skip("no second writable filesystem (/dev/shm) to link across")
    path = Path(tempfile.mkdtemp(prefix="se-dv-", dir=other))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_auto_falls_back_to_bind_mounts_across_filesystems(data_elsewhere: Path, run_dir: Path) -> None:
    _write(data_elsewhere, "a.csv")
    _write(data_elsewhere, "b.csv")
    with DataView(run_dir / "view", data_elsewhere, scan(data_elsewhere), gid=GID) as view:
        assert view.method == "bind"
        assert view.names == {"a.csv", "b.csv"}
        assert len(view.mounts("/data")) == 3
    assert "bind mounts" in view_method(run_dir, data_elsewhere)
    assert "SANDBOX_EXECUTOR_RUN_DIR" in view_method(run_dir, data_elsewhere)


def test_auto_fallback_still_keeps_the_bind_limit(
    data_elsewhere: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataview, "MAX_BIND_FILES", 1)
    _write(data_elsewhere, "a.csv")
    _write(data_elsewhere, "b.csv")
    with pytest.raises(DataSourceError, match="over the limit of 1 per batch"):
        DataView(run_dir / "view", data_elsewhere, scan(data_elsewhere), gid=GID)
    assert not (run_dir / "view").exists()


def test_hardlink_method_fails_clearly_across_filesystems(data_elsewhere: Path, run_dir: Path) -> None:
    _write(data_elsewhere, "a.csv")
    with pytest.raises(DataSourceError, match=r"cannot hard-link 'a\.csv'.*SANDBOX_EXECUTOR_RUN_DIR"):
        DataView(run_dir / "view", data_elsewhere, scan(data_elsewhere), gid=GID, method="hardlink")
    assert not (run_dir / "view").exists()


def test_a_refused_link_falls_back_for_that_file_only(
    data: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write(data, "mine.csv")
    _write(data, "theirs.csv")
    real_link = os.link

    def link(src: Any, dst: Any, **kwargs: Any) -> None:
        if str(src) == "theirs.csv":  # as fs.protected_hardlinks refuses another user's file
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", link)
    with DataView(run_dir / "view", data, scan(data), gid=GID) as view:
        assert view.method == "bind"
        assert (view.path / "mine.csv").lstat().st_ino == (data / "mine.csv").lstat().st_ino
        assert (view.path / "theirs.csv").lstat().st_size == 0
        assert [m.target for m in view.mounts("/data")] == ["/data", "/data/theirs.csv"]


def test_a_path_with_a_colon_is_bind_mounted_like_any_other(data: Path, run_dir: Path) -> None:
    # The engine gets Mount objects, not "source:target:mode" strings (a real
    # container reads such a file in tests/security/test_data_views.py).
    _write(data, "10:30.csv")
    with DataView(run_dir / "view", data, scan(data), gid=GID, method="bind") as view:
        assert [m.target for m in view.mounts("/data")] == ["/data", "/data/10:30.csv"]


def test_an_empty_view_is_an_empty_directory(data: Path, run_dir: Path) -> None:
    with DataView(run_dir / "view", data, [], gid=GID) as view:
        assert view.path.is_dir()
        assert list(view.path.iterdir()) == []
        assert view.method == "hardlink"


def test_remove_is_safe_twice_and_never_removes_what_it_did_not_make(data: Path, run_dir: Path) -> None:
    _write(data, "a.csv")
    view = DataView(run_dir / "view", data, scan(data), gid=GID)
    view.remove()
    view.remove()
    assert not view.path.exists()
    assert (data / "a.csv").exists()

    taken = run_dir / "taken"
    taken.mkdir()
    _write(taken, "someone-elses")
    with pytest.raises(FileExistsError):
        DataView(taken, data, scan(data), gid=GID)
    assert (taken / "someone-elses").exists()


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a//b", "./a", "a/..", "", "a/b/"])
def test_names_that_could_leave_the_data_directory_are_refused(data: Path, run_dir: Path, name: str) -> None:
    with pytest.raises(ValueError):
        DataView(run_dir / "view", data, [FileStamp(name, 1, 1)], gid=GID)
    assert not (run_dir / "view").exists()


def test_unknown_method_and_duplicate_names_are_refused(data: Path, run_dir: Path) -> None:
    _write(data, "a.csv")
    with pytest.raises(ValueError, match="method"):
        DataView(run_dir / "view", data, scan(data), gid=GID, method="copy")
    with pytest.raises(ValueError, match="unique"):
        DataView(run_dir / "view", data, scan(data) * 2, gid=GID)


def test_a_missing_data_directory_is_a_data_source_error(tmp_path: Path, run_dir: Path) -> None:
    with pytest.raises(DataSourceError, match="cannot read data directory"):
        DataView(run_dir / "view", tmp_path / "absent", [FileStamp("a", 1, 1)], gid=GID)
    assert not (run_dir / "view").exists()


# -- as a non-root parent -----------------------------------------------------------------------


def _unprivileged_view(shared_tmp: Path, gid: int) -> dict[str, Any]:
    data, run = shared_tmp / "data", shared_tmp / "run"

    def build() -> dict[str, Any]:
        with DataView(run / "view", data, scan(data), gid=gid) as view:
            return {
                "method": view.method,
                "names": sorted(view.names),
                "targets": [m.target for m in view.mounts("/data")],
                "modes": {
                    str(p.relative_to(view.path)): stat.S_IMODE(p.lstat().st_mode)
                    for p in [view.path, *view.path.rglob("*")]
                },
                "view_gid": view.path.lstat().st_gid,
            }

    return dict(_as_unprivileged(build))


@pytest.fixture
def shared_data(shared_tmp: Path) -> Path:
    """Data and a run directory the unprivileged user may use: files it owns, and one it does not."""
    data, run = shared_tmp / "data", shared_tmp / "run"
    _write(data, "own/a.csv")
    _write(data, "root.csv")
    (data / "root.csv").chmod(0o644)
    run.mkdir()
    if IS_ROOT:
        for p in (data, data / "own", data / "own" / "a.csv", run):
            os.chown(p, NOBODY, NOBODY)
    return data


@pytest.mark.skipif(not IS_ROOT, reason="needs another user's file to link")
def test_non_root_links_its_own_files_and_binds_another_users(shared_tmp: Path, shared_data: Path) -> None:
    if not filesystem.protected_hardlinks():
        pytest.skip("fs.protected_hardlinks is off: any file can be linked")
    got = _unprivileged_view(shared_tmp, GID)
    assert got["method"] == "bind"
    assert got["names"] == ["own/a.csv", "root.csv"]
    assert got["targets"] == ["/data", "/data/root.csv"]
    # nobody is not in the sandbox's group: the view is opened to all, and only for reading.
    assert got["modes"] == {".": 0o755, "own": 0o755, "own/a.csv": 0o644, "root.csv": 0o444}
    assert (shared_data / "root.csv").stat().st_nlink == 1


@pytest.mark.skipif(not IS_ROOT, reason="switches to another user")
def test_non_root_in_the_sandbox_group_keeps_the_view_to_that_group(
    shared_tmp: Path, shared_data: Path
) -> None:
    got = _unprivileged_view(shared_tmp, NOBODY)  # the group nobody is in
    assert got["view_gid"] == NOBODY
    assert got["modes"]["."] == 0o750
    assert got["modes"]["own"] == 0o750


# -- view_method --------------------------------------------------------------------------------


def test_view_method_on_one_filesystem_is_hard_links(data: Path, run_dir: Path) -> None:
    assert view_method(run_dir, data).startswith("hard links")
    assert view_method(run_dir / "not" / "made" / "yet", data).startswith("hard links")


def test_view_method_without_data_names_both(run_dir: Path) -> None:
    text = view_method(run_dir)
    assert "hard links" in text
    assert f"bind mounts per file (at most {MAX_BIND_FILES} per batch)" in text


def test_view_method_with_unreadable_data_says_so(tmp_path: Path, run_dir: Path) -> None:
    assert view_method(run_dir, tmp_path / "absent").startswith("unknown: cannot read data directory")


@pytest.mark.parametrize("swap_for", ["symlink", "other file"])
def test_a_file_swapped_between_its_check_and_its_link_is_not_in_the_view(
    data: Path, run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, swap_for: str
) -> None:
    _write(data, "ok.csv", "fine")
    _write(data, "raced.csv", "same size")
    impostor = _write(tmp_path, "impostor.csv", "same size")
    files = scan(data)
    real_lstat_at = dataview._lstat_at

    def lstat_then_swap(dir_fd: int, name: str) -> os.stat_result | None:
        st = real_lstat_at(dir_fd, name)
        if name == "raced.csv":
            assert st is not None  # after the check, before the link
            (data / "raced.csv").unlink()
            if swap_for == "symlink":
                (data / "raced.csv").symlink_to(impostor)
            else:
                os.link(impostor, data / "raced.csv")
                os.utime(data / "raced.csv", ns=(st.st_atime_ns, st.st_mtime_ns))
        return st

    monkeypatch.setattr(dataview, "_lstat_at", lstat_then_swap)
    with DataView(run_dir / "view", data, files, gid=GID) as view:
        assert view.names == {"ok.csv"}
        assert view.missing == {"raced.csv"}
        assert _tree(view.path) == {"ok.csv"}


def test_a_plan_needing_too_many_bind_mounts_is_refused_before_anything_starts(
    data: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = MAX_BIND_FILES + 1
    check_view_budget(run_dir, data, "auto", big)  # one filesystem: hard links, no limit
    check_view_budget(run_dir, data, "bind", MAX_BIND_FILES)
    with pytest.raises(DataSourceError, match=f"each of {big} files, over the limit of {MAX_BIND_FILES}"):
        check_view_budget(run_dir, data, "bind", big)
    # The run directory on another filesystem: auto means bind mounts.
    monkeypatch.setattr(filesystem, "_device", lambda path: os.stat(data).st_dev + 1)
    with pytest.raises(DataSourceError, match="put the run directory"):
        check_view_budget(run_dir, data, "auto", big)
    check_view_budget(run_dir, data, "hardlink", big)


# -- paths too long for a view ----------------------------------------------------------------


def test_a_name_too_long_for_any_view_is_unusable_with_its_reason() -> None:
    paths = ViewPaths(("/run/se/t-12345678/data", "/data"))
    assert paths.reason("a/b.csv") is None
    long_component = "x" * (NAME_MAX + 1)
    reason = paths.reason(f"dir/{long_component}")
    assert reason is not None and f"{NAME_MAX + 1} bytes" in reason
    # 4095 bytes is the longest path the kernel takes; the host root is the longer one here.
    root = "/run/se/t-12345678/data/"
    fits = "/".join(["y" * 200] * 19) + "/" + "z" * (PATH_MAX - 1 - len(root) - 19 * 201)
    assert len(root + fits) == PATH_MAX - 1
    assert paths.reason(fits) is None
    reason = paths.reason(fits + "z")
    assert reason is not None and "/run/se/t-12345678/data" in reason and f"{PATH_MAX} bytes" in reason


def test_view_paths_count_the_sandbox_path_and_the_datasource_only_for_bind_views(
    data: Path, run_dir: Path
) -> None:
    from executor.task.taskdir import TaskDir

    linked = ViewPaths.of(run_dir, data, "auto", "/data", view_dir=data_view_path(run_dir))
    assert linked.roots == (str(data_view_path(run_dir)), "/data")
    bound = ViewPaths.of(run_dir, data, "bind", "/data", view_dir=data_view_path(run_dir))
    assert bound.roots == (*linked.roots, os.path.realpath(data))
    # The estimate is as long as a real task directory's view path.
    with TaskDir(run_dir, os.getuid()) as task_dir:
        assert len(str(task_dir.data)) == len(str(data_view_path(run_dir)))


def test_select_counts_unusable_files_apart_and_the_counts_still_add_up(
    caplog: pytest.LogCaptureFixture,
) -> None:
    long = "d" * 300 + "/x.csv"
    files = [FileStamp("a.csv", 1, 1), FileStamp(long, 1, 1), FileStamp("b.csv", 1, 1)]
    with caplog.at_level(logging.WARNING, logger="executor.data.selection"):
        selection = select(
            files,
            processed={},
            failed={"b.csv": (1, 1)},
            new_data_only=False,
            force_rerun_failed=False,
            max_files=None,
            view_paths=ViewPaths(("/data",)),
        )
    assert _names(selection.files) == ["a.csv"]
    assert selection.counts() == {
        "total": 3,
        "selected": 1,
        "skipped_processed": 0,
        "skipped_failed": 1,
        "over_limit": 0,
        "skipped_unusable": 1,
    }
    assert "1 datasource file(s) skipped: no data view can show them" in caplog.text
    with pytest.raises(ValueError, match="do not add up"):
        Selection(files=(), total=1)


def test_a_file_deeper_than_path_max_is_left_out_of_the_view_not_fatal(
    data: Path, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: making the view raised OSError ENAMETOOLONG, which failed every
    # task on this datasource with exit status 2.
    _write(data, "a.csv")
    deep = deep_file(data, PATH_MAX + 100)
    files = scan(data)
    assert sorted(_names(files)) == sorted(["a.csv", deep])  # the scan reaches it through descriptors
    with caplog.at_level(logging.WARNING, logger="executor.data.view"):
        view = DataView(run_dir / "view", data, files, gid=GID)
    with view:
        assert _names(view.files) == ["a.csv"]
        assert view.missing == {deep}
        assert _tree(view.path) == {"a.csv"}  # not one directory of the deep file's
    assert "path too long for the view" in caplog.text


def test_a_bind_view_leaves_out_a_file_whose_source_path_the_engine_could_not_mount(
    tmp_path: Path, run_dir: Path
) -> None:
    # The file fits the view (its path there is 4095 bytes) but not a bind
    # mount: the datasource's own path is longer than the view's.
    data = tmp_path / "a-datasource-whose-path-is-longer-than-the-view-s"
    data.mkdir()
    _write(data, "a.csv")
    view_root = run_dir / "view"
    deep = deep_file(data, PATH_MAX - 1 - len(os.fsencode(view_root)) - 1)
    assert len(os.fsencode(view_root / deep)) == PATH_MAX - 1
    assert len(os.fsencode(Path(os.path.realpath(data)) / deep)) >= PATH_MAX
    with DataView(view_root, data, scan(data), gid=GID, method="bind") as view:
        assert _names(view.files) == ["a.csv"]
        assert view.missing == {deep}
        assert _tree(view.path) == {"a.csv"}
    with DataView(view_root, data, scan(data), gid=GID, method="hardlink") as view:
        assert sorted(_names(view.files)) == sorted(["a.csv", deep])  # a link is made through descriptors


def test_one_same_filesystem_check_decides_links_the_bind_budget_and_doctors_words(
    data: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = MAX_BIND_FILES + 1
    assert filesystem.same_filesystem(run_dir, data)
    assert ViewPaths.of(run_dir, data, "auto", "/data", view_dir=run_dir / "v").roots == (
        str(run_dir / "v"),
        "/data",
    )
    # Only the one check is told the run directory moved to another filesystem.
    monkeypatch.setattr(filesystem, "_device", lambda path: os.stat(data).st_dev + 1)
    assert not filesystem.may_link(run_dir, data)
    assert (
        os.path.realpath(data) in ViewPaths.of(run_dir, data, "auto", "/data", view_dir=run_dir / "v").roots
    )
    with pytest.raises(DataSourceError, match="put the run directory"):
        check_view_budget(run_dir, data, "auto", big)
    assert "are on different filesystems" in view_method(run_dir, data)
    # Unreadable data: no link, and doctor says why.
    assert not filesystem.may_link(run_dir, data / "absent")
    with pytest.raises(OSError):
        filesystem.same_filesystem(run_dir, data / "absent")
