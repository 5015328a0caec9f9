"""Which of a datasource's files a task may see, and how they split into batches.

The trusted parent decides; the sandbox never does. :func:`select` applies the
task's flags (new data only, rerun failed files, test run, file limits)
against what the project store remembers of the task hash, and
:func:`plan_batches` splits the selection into the batches whose views the
sandbox sees one at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from executor.data.scan import FileStamp
    from executor.data.viewpaths import ViewPaths

log = logging.getLogger(__name__)

TEST_RUN_MAX_FILES = 1
"""Files a test run sees: the seed SDK's ``test_run_number_of_files`` setting defaults to 1.

(bitfount's ``config.settings.test_run_number_of_files``, "the number of files
part of a test run", ``Field(default=1, gt=0)``.)
"""


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
            (see :class:`~executor.data.viewpaths.ViewPaths`).
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
