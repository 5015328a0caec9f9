"""Data views: exactly the selected files, read-only to the sandbox, never a copied byte."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from executor.backends import Mount
from executor.data import filesystem
from executor.data import view as dataview
from executor.data.scan import FileStamp, scan
from executor.data.view import MAX_BIND_FILES, DataView, check_view_budget, view_method
from executor.data.viewpaths import PATH_MAX, ViewPaths
from executor.errors import DataSourceError
from tests import datatree
from tests.datatree import GID, IS_ROOT, NOBODY, as_unprivileged, names, tree, write
from tests.deeptree import deep_file

if TYPE_CHECKING:
    from collections.abc import Iterator


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
    with datatree.shared_tmp() as path:
        yield path


# -- DataView -----------------------------------------------------------------------------------


def _snapshot(path: Path) -> tuple[bytes, int, int, int, int, int]:
    st = path.lstat()
    return (path.read_bytes(), st.st_mode, st.st_mtime_ns, st.st_uid, st.st_gid, st.st_nlink)


def test_view_holds_hard_links_to_exactly_the_selected_files(data: Path, run_dir: Path) -> None:
    for name in ("a.csv", "b.csv", "sub/c.csv", "sub/d.csv", "other/e.csv"):
        write(data, name, name)
    (data / "sub" / "c.csv").chmod(0o640)
    before = {p: _snapshot(p) for p in data.rglob("*") if p.is_file()}
    chosen = [f for f in scan(data) if f.name in {"a.csv", "sub/c.csv"}]

    with DataView(run_dir / "view", data, chosen, gid=GID) as view:
        assert view.path == run_dir / "view"
        assert view.method == "hardlink"
        assert view.names == {"a.csv", "sub/c.csv"}
        assert view.files == tuple(chosen)
        assert view.missing == frozenset()
        assert tree(view.path) == {"a.csv", "sub/c.csv"}
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
    write(data, "sub/c.csv")
    with DataView(run_dir / "view", data, scan(data), gid=GID) as view:
        for d in (view.path, view.path / "sub"):
            st = d.lstat()
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, GID)


def test_a_file_swapped_for_a_symlink_after_the_scan_is_not_in_the_view(
    data: Path, run_dir: Path, tmp_path: Path
) -> None:
    write(data, "ok.csv", "fine")
    write(data, "swapped.csv", "same size")
    secret = write(tmp_path, "secret.csv", "same size")
    files = scan(data)
    st = (data / "swapped.csv").stat()
    (data / "swapped.csv").unlink()
    (data / "swapped.csv").symlink_to(secret)
    os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)  # same size and mtime

    with DataView(run_dir / "view", data, files, gid=GID) as view:
        assert view.names == {"ok.csv"}
        assert view.missing == {"swapped.csv"}
        assert tree(view.path) == {"ok.csv"}
    assert secret.stat().st_nlink == 1


def test_a_directory_swapped_for_a_symlink_after_the_scan_is_not_followed(
    data: Path, run_dir: Path, tmp_path: Path
) -> None:
    write(data, "sub/x.csv", "x")
    files = scan(data)
    outside = tmp_path / "outside"
    outside.mkdir()
    os.replace(data / "sub" / "x.csv", outside / "x.csv")  # the same inode, size and mtime
    (data / "sub").rmdir()
    (data / "sub").symlink_to(outside, target_is_directory=True)

    with DataView(run_dir / "view", data, files, gid=GID) as view:
        assert view.names == frozenset()
        assert view.missing == {"sub/x.csv"}
        assert tree(view.path) == set()


def test_changed_and_vanished_files_are_reported_missing_not_fatal(data: Path, run_dir: Path) -> None:
    for name in ("grew.csv", "touched.csv", "gone.csv", "kept.csv", "replaced.csv"):
        write(data, name, "abc")
    files = scan(data)
    write(data, "grew.csv", "abcd")
    st = (data / "touched.csv").stat()
    os.utime(data / "touched.csv", ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    (data / "gone.csv").unlink()
    (data / "replaced.csv").unlink()
    os.mkfifo(data / "replaced.csv")

    with DataView(run_dir / "view", data, files, gid=GID) as view:
        assert view.names == {"kept.csv"}
        assert view.missing == {"grew.csv", "touched.csv", "gone.csv", "replaced.csv"}
        assert tree(view.path) == {"kept.csv"}


def test_bind_method_gives_placeholders_and_one_read_only_mount_per_file(data: Path, run_dir: Path) -> None:
    write(data, "a.csv", "aaa")
    write(data, "sub/b.csv", "bb")
    write(data, "not-chosen.csv")
    chosen = [f for f in scan(data) if f.name != "not-chosen.csv"]

    with DataView(run_dir / "view", data, chosen, gid=GID, method="bind") as view:
        assert view.method == "bind"
        assert view.names == {"a.csv", "sub/b.csv"}
        assert tree(view.path) == {"a.csv", "sub/b.csv"}
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
    write(data, "a.csv")
    via_link = tmp_path / "via-link"
    via_link.symlink_to(data, target_is_directory=True)
    with DataView(run_dir / "view", via_link, scan(via_link), gid=GID, method="bind") as view:
        assert view.mounts("/data")[1].source == data.resolve() / "a.csv"


def test_too_many_bind_mounts_is_a_one_line_error(
    data: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dataview, "MAX_BIND_FILES", 2)
    for i in range(3):
        write(data, f"{i}.csv")
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
    write(data_elsewhere, "a.csv")
    write(data_elsewhere, "b.csv")
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
    write(data_elsewhere, "a.csv")
    write(data_elsewhere, "b.csv")
    with pytest.raises(DataSourceError, match="over the limit of 1 per batch"):
        DataView(run_dir / "view", data_elsewhere, scan(data_elsewhere), gid=GID)
    assert not (run_dir / "view").exists()


def test_hardlink_method_fails_clearly_across_filesystems(data_elsewhere: Path, run_dir: Path) -> None:
    write(data_elsewhere, "a.csv")
    with pytest.raises(DataSourceError, match=r"cannot hard-link 'a\.csv'.*SANDBOX_EXECUTOR_RUN_DIR"):
        DataView(run_dir / "view", data_elsewhere, scan(data_elsewhere), gid=GID, method="hardlink")
    assert not (run_dir / "view").exists()


def test_a_refused_link_falls_back_for_that_file_only(
    data: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(data, "mine.csv")
    write(data, "theirs.csv")
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
    write(data, "10:30.csv")
    with DataView(run_dir / "view", data, scan(data), gid=GID, method="bind") as view:
        assert [m.target for m in view.mounts("/data")] == ["/data", "/data/10:30.csv"]


def test_an_empty_view_is_an_empty_directory(data: Path, run_dir: Path) -> None:
    with DataView(run_dir / "view", data, [], gid=GID) as view:
        assert view.path.is_dir()
        assert list(view.path.iterdir()) == []
        assert view.method == "hardlink"


def test_remove_is_safe_twice_and_never_removes_what_it_did_not_make(data: Path, run_dir: Path) -> None:
    write(data, "a.csv")
    view = DataView(run_dir / "view", data, scan(data), gid=GID)
    view.remove()
    view.remove()
    assert not view.path.exists()
    assert (data / "a.csv").exists()

    taken = run_dir / "taken"
    taken.mkdir()
    write(taken, "someone-elses")
    with pytest.raises(FileExistsError):
        DataView(taken, data, scan(data), gid=GID)
    assert (taken / "someone-elses").exists()


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a//b", "./a", "a/..", "", "a/b/"])
def test_names_that_could_leave_the_data_directory_are_refused(data: Path, run_dir: Path, name: str) -> None:
    with pytest.raises(ValueError, match=re.escape(f"not a datasource-relative file name: {name!r}")):
        DataView(run_dir / "view", data, [FileStamp(name, 1, 1)], gid=GID)
    assert not (run_dir / "view").exists()


def test_unknown_method_and_duplicate_names_are_refused(data: Path, run_dir: Path) -> None:
    write(data, "a.csv")
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

    return dict(as_unprivileged(build))


@pytest.fixture
def shared_data(shared_tmp: Path) -> Path:
    """Data and a run directory the unprivileged user may use: files it owns, and one it does not."""
    data, run = shared_tmp / "data", shared_tmp / "run"
    write(data, "own/a.csv")
    write(data, "root.csv")
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
    write(data, "ok.csv", "fine")
    write(data, "raced.csv", "same size")
    impostor = write(tmp_path, "impostor.csv", "same size")
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
        assert tree(view.path) == {"ok.csv"}


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


def test_a_file_deeper_than_path_max_is_left_out_of_the_view_not_fatal(
    data: Path, run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Before: making the view raised OSError ENAMETOOLONG, which failed every
    # task on this datasource with exit status 2.
    write(data, "a.csv")
    deep = deep_file(data, PATH_MAX + 100)
    files = scan(data)
    assert sorted(names(files)) == sorted(["a.csv", deep])  # the scan reaches it through descriptors
    with caplog.at_level(logging.WARNING, logger="executor.data.view"):
        view = DataView(run_dir / "view", data, files, gid=GID)
    with view:
        assert names(view.files) == ["a.csv"]
        assert view.missing == {deep}
        assert tree(view.path) == {"a.csv"}  # not one directory of the deep file's
    assert "path too long for the view" in caplog.text


def test_a_bind_view_leaves_out_a_file_whose_source_path_the_engine_could_not_mount(
    tmp_path: Path, run_dir: Path
) -> None:
    # The file fits the view (its path there is 4095 bytes) but not a bind
    # mount: the datasource's own path is longer than the view's.
    data = tmp_path / "a-datasource-whose-path-is-longer-than-the-view-s"
    data.mkdir()
    write(data, "a.csv")
    view_root = run_dir / "view"
    deep = deep_file(data, PATH_MAX - 1 - len(os.fsencode(view_root)) - 1)
    assert len(os.fsencode(view_root / deep)) == PATH_MAX - 1
    assert len(os.fsencode(Path(os.path.realpath(data)) / deep)) >= PATH_MAX
    with DataView(view_root, data, scan(data), gid=GID, method="bind") as view:
        assert names(view.files) == ["a.csv"]
        assert view.missing == {deep}
        assert tree(view.path) == {"a.csv"}
    with DataView(view_root, data, scan(data), gid=GID, method="hardlink") as view:
        assert sorted(names(view.files)) == sorted(["a.csv", deep])  # a link is made through descriptors


def test_one_same_filesystem_check_decides_links_the_bind_budget_and_doctors_words(
    data: Path, run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def roots() -> tuple[str, ...]:
        return ViewPaths.of(run_dir, data, "auto", "/data", view_dir=run_dir / "v").roots

    assert filesystem.same_filesystem(run_dir, data)
    assert roots() == (str(run_dir / "v"), "/data")
    # Only the one check is told the run directory moved to another filesystem.
    monkeypatch.setattr(filesystem, "_device", lambda path: os.stat(data).st_dev + 1)
    assert not filesystem.may_link(run_dir, data)
    assert os.path.realpath(data) in roots()
    with pytest.raises(DataSourceError, match="put the run directory"):
        check_view_budget(run_dir, data, "auto", MAX_BIND_FILES + 1)
    assert "are on different filesystems" in view_method(run_dir, data)
    # Unreadable data: no link, and doctor says why.
    assert not filesystem.may_link(run_dir, data / "absent")
    with pytest.raises(FileNotFoundError):
        filesystem.same_filesystem(run_dir, data / "absent")
