"""The datasource scan: regular files only, never through a link, within its caps."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from executor.data import scan as datascan
from executor.data.scan import scan
from executor.errors import DataSourceError
from tests import datatree
from tests.datatree import IS_ROOT, as_unprivileged, names, write

if TYPE_CHECKING:
    from collections.abc import Iterator


@pytest.fixture
def data(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    return root


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    with datatree.shared_tmp() as path:
        yield path


# -- scan ---------------------------------------------------------------------------------------


def test_scan_lists_regular_files_sorted_with_size_and_mtime(data: Path) -> None:
    write(data, "b.csv", "12345")
    write(data, "a.csv", "1")
    write(data, "sub/deeper/c.csv", "123")
    write(data, "a.txt")
    os.utime(data / "b.csv", ns=(1_000_000_123, 2_000_000_456))

    files = scan(data)

    assert names(files) == ["a.csv", "a.txt", "b.csv", "sub/deeper/c.csv"]
    b = files[2]
    assert (b.size, b.mtime_ns) == (5, 2_000_000_456)
    assert files[3].size == 3


def test_scan_never_follows_or_lists_symlinks_fifos_or_dangling_links(data: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    write(outside, "secret.csv", "patient data the task may not see")
    write(data, "real.csv")
    (data / "to_file.csv").symlink_to(outside / "secret.csv")
    (data / "to_dir").symlink_to(outside, target_is_directory=True)
    (data / "dangling.csv").symlink_to(tmp_path / "nowhere")
    (data / "sub").mkdir()
    (data / "sub" / "up").symlink_to(data, target_is_directory=True)
    os.mkfifo(data / "pipe.csv")

    assert names(scan(data)) == ["real.csv"]


def test_scan_does_not_follow_a_directory_swapped_for_a_symlink_while_it_runs(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outside = tmp_path / "outside"
    write(outside, "secret.csv")
    write(data, "sub/x.csv")
    write(data, "top.csv")
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
    assert names(scan(data)) == ["top.csv"]


def test_scan_skips_names_that_are_not_utf8_and_says_so(data: Path, caplog: pytest.LogCaptureFixture) -> None:
    write(data, "good.csv")
    with open(os.path.join(os.fsencode(data), b"bad-\xff.csv"), "w") as f:
        f.write("x")
    os.mkdir(os.path.join(os.fsencode(data), b"dir-\xfe"))
    write(Path(os.fsdecode(os.path.join(os.fsencode(data), b"dir-\xfe"))), "inner.csv")

    with caplog.at_level(logging.WARNING, logger="executor.data.scan"):
        files = scan(data)

    assert names(files) == ["good.csv"]
    assert "skipped 2 entries whose names are not valid UTF-8" in caplog.text


def test_scan_keeps_other_unicode_names(data: Path) -> None:
    write(data, "ärzte/bericht ü 1.csv")
    assert names(scan(data)) == ["ärzte/bericht ü 1.csv"]


def test_scan_of_a_missing_directory_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="cannot read data directory") as info:
        scan(tmp_path / "absent")
    assert "\n" not in str(info.value)


def test_scan_caps_the_number_of_files(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datascan, "MAX_SCAN_FILES", 3)
    for i in range(3):
        write(data, f"sub/{i}.csv")
    assert len(scan(data)) == 3
    write(data, "one-more.csv")
    with pytest.raises(DataSourceError, match="holds more than 3 files"):
        scan(data)


def test_scan_caps_the_depth(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datascan, "MAX_SCAN_DEPTH", 2)
    write(data, "a/b/ok.csv")
    assert names(scan(data)) == ["a/b/ok.csv"]
    write(data, "a/b/c/deep.csv")
    with pytest.raises(DataSourceError, match="nests deeper than 2"):
        scan(data)


def test_scan_names_an_unreadable_subdirectory(shared_tmp: Path) -> None:
    data = shared_tmp / "data"
    write(data, "ok.csv")
    write(data, "closed/hidden.csv")
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
        message = as_unprivileged(attempt)
    finally:
        (data / "closed").chmod(0o700)
    assert "'closed'" in message
    assert str(data) in message
    assert "\n" not in message
