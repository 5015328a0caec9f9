"""Which files a task may see and in which batches, and the path rules that leave some out."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import pytest

from executor.data.scan import FileStamp
from executor.data.selection import TEST_RUN_MAX_FILES, Selection, effective_max_files, plan_batches, select
from executor.data.viewpaths import NAME_MAX, PATH_MAX, ViewPaths
from executor.task.taskdir import data_view_path
from tests.datatree import names

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path


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
    assert "".join(names(selection.files)) == kept
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
    with pytest.raises(ValueError, match=r"max_files must be 0 \(no limit\) or more, not -1"):
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
    assert [names(b) for b in batches] == [["f00", "f01"], ["f02", "f03"], ["f04"]]
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
    with pytest.raises(ValueError, match="batch_size and max_batches must be 0 or more, not -1, 0"):
        plan_batches(_selection(2), -1, 0)
    with pytest.raises(ValueError, match="batch_size and max_batches must be 0 or more, not 1, -1"):
        plan_batches(_selection(2), 1, -1)


# -- paths too long for any view ------------------------------------------------------------


def test_a_name_too_long_for_any_view_is_unusable_with_its_reason() -> None:
    paths = ViewPaths(("/run/se/t-12345678/data", "/data"))
    assert paths.reason("a/b.csv") is None
    long_component = "x" * (NAME_MAX + 1)
    reason = paths.reason(f"dir/{long_component}")
    assert reason is not None
    assert f"{NAME_MAX + 1} bytes" in reason
    # 4095 bytes is the longest path the kernel takes; the host root is the longer one here.
    root = "/run/se/t-12345678/data/"
    fits = "/".join(["y" * 200] * 19) + "/" + "z" * (PATH_MAX - 1 - len(root) - 19 * 201)
    assert len(root + fits) == PATH_MAX - 1
    assert paths.reason(fits) is None
    reason = paths.reason(fits + "z")
    assert reason is not None
    assert "/run/se/t-12345678/data" in reason
    assert f"{PATH_MAX} bytes" in reason


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
    assert names(selection.files) == ["a.csv"]
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
