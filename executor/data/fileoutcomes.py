"""Per-file outcomes a task reports: the caps on what the parent keeps, in one place.

A sandbox may report every file of its view as processed or failed, with a
reason. All of it is held in the parent's memory until the task ends and then
printed as JSON, so each cap below bounds the parent, not the sandbox: the
number of files, the characters of their names and of their reasons, and how
many failures the JSON lists one by one. Counts always stay exact.
"""

from __future__ import annotations

import enum

from executor.errors import FileLimitError as FileLimitError

# Per call (the wire contract, which the sandbox truncates to): file outcomes
# in one report, characters in one file name and in one reason.
from executor.sandbox.contract import MAX_FILE_NAME_CHARS as MAX_FILE_NAME_CHARS
from executor.sandbox.contract import MAX_FILE_REASON_CHARS as MAX_FILE_REASON_CHARS
from executor.sandbox.contract import MAX_FILES_PER_CALL as MAX_FILES_PER_CALL


class FileKind(enum.StrEnum):
    """How a protocol says one datasource file went (``executor.v1.FileOutcome.Kind``)."""

    PROCESSED = "PROCESSED"
    FAILED = "FAILED"


MAX_FILES_PER_TASK = 100_000
"""Distinct files one task may report; reports beyond are refused."""
MAX_FILE_NAME_CHARS_PER_TASK = 16 * 1024 * 1024
"""Characters of the distinct file names one task may report; beyond are refused."""
MAX_REASON_CHARS_PER_TASK = 256 * 1024
"""Characters of reasons one task may store (at most 1 MiB held); beyond it a
reason is replaced by :data:`REASON_DROPPED` and the outcome still counted."""
MAX_FAILED_FILES_IN_JSON = 1000
"""Failed files the JSON outcome lists with their reasons; the rest are counted."""

REASON_DROPPED = "(reason not kept: the task's budget for failure reasons is spent)"


class FileLedger:
    """The per-file outcomes of one task, kept within the caps above.

    Not thread-safe: the session calls it under its own lock.
    """

    def __init__(self) -> None:
        self._files: dict[str, tuple[FileKind, str]] = {}
        self._name_chars = 0
        self.reason_chars = 0

    def record(self, outcomes: list[tuple[str, FileKind, str]]) -> None:
        """Record checked ``(name, kind, reason)`` triples; a later report of a name wins.

        Raises:
            FileLimitError: The new names would exceed the per-task caps; nothing
                of this report is recorded then.
        """
        new_names = {name for name, _, _ in outcomes if name not in self._files}
        if len(self._files) + len(new_names) > MAX_FILES_PER_TASK:
            raise FileLimitError(f"at most {MAX_FILES_PER_TASK} file outcomes per task")
        name_chars = sum(map(len, new_names))
        if self._name_chars + name_chars > MAX_FILE_NAME_CHARS_PER_TASK:
            raise FileLimitError(f"at most {MAX_FILE_NAME_CHARS_PER_TASK} characters of file names per task")
        self._name_chars += name_chars
        for name, kind, reason in outcomes:
            # Held characters: every stored reason except the shared marker object
            # (compared by identity: a sandbox's copy of its text costs memory).
            old = self._files.get(name)
            if old is not None and old[1] is not REASON_DROPPED:
                self.reason_chars -= len(old[1])
            if self.reason_chars + len(reason) > MAX_REASON_CHARS_PER_TASK:
                reason = REASON_DROPPED
            elif reason is not REASON_DROPPED:
                self.reason_chars += len(reason)
            self._files[name] = (kind, reason)

    def snapshot(self) -> dict[str, tuple[FileKind, str]]:
        """A copy of what is recorded: name -> (kind, reason)."""
        return dict(self._files)

    def __len__(self) -> int:
        return len(self._files)
