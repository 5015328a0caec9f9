"""Human output for the CLI: progress bars fed by a task's events, and the closing summary.

Every string here that came from the sandbox passes through
:func:`executor.cli.terminal.printable` and is printed as plain text, never as rich
markup.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from executor.cli.terminal import printable
from executor.data.fileoutcomes import FileKind
from executor.events import AlgorithmProgress, BatchRun, Event, ProgressKind, ProgressUpdate, TaskStarted

if TYPE_CHECKING:
    from types import TracebackType

    from executor.outcome import Outcome

MAX_INFO_SHOWN = 60
MAX_FAILED_FILES_SHOWN = 5


class ProgressDisplay:
    """Draws batch, file, epoch and step bars on stderr as a task's events arrive.

    :meth:`on_event` is a hook (:mod:`executor.hooks`); :meth:`update` takes a
    bare progress event.
    """

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            TimeElapsedColumn(),
            console=self._console,
            transient=False,
        )
        self._started = False
        self._epochs: TaskID | None = None
        self._steps: TaskID | None = None
        self._batches: TaskID | None = None
        self._files: TaskID | None = None
        self._selected: int | None = None
        self._total_batches = 0

    def __enter__(self) -> ProgressDisplay:
        # Drawing starts with the first event, so that an error raised before
        # the task runs is the only thing printed.
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._started:
            self._progress.stop()

    def _begin(self) -> Progress:
        """Start drawing, with the task's batch and file bars: only once it has begun work.

        So a task refused before it ran (no engine, no image) prints nothing but its error.
        """
        p = self._progress
        if not self._started:
            self._started = True
            p.start()
            if self._selected is not None:
                self._files = p.add_task("files", total=self._selected, info="")
            if self._total_batches > 1:
                self._batches = p.add_task("batches", total=self._total_batches, info="")
        return p

    def on_event(self, event: Event) -> None:
        """Apply one task event (a hook: called from the dispatcher's thread)."""
        if isinstance(event, TaskStarted):
            self._selected = event.selection.get("selected", 0)
            self._total_batches = event.total_batches
        elif isinstance(event, AlgorithmProgress):
            self.update(event)
        elif isinstance(event, BatchRun):
            p = self._begin()
            if self._batches is not None and event.statistics.get("status") == "OK":
                p.update(self._batches, completed=event.batch_number)
            if self._files is not None:
                done = int(event.statistics.get("processed", 0)) + int(event.statistics.get("failed", 0))
                p.advance(self._files, done)

    def update(self, event: ProgressUpdate) -> None:
        """Apply one progress event (called from a server thread)."""
        p = self._begin()
        if event.kind in (ProgressKind.EPOCH_START, ProgressKind.EPOCH_END) and event.max_epochs:
            if self._epochs is None:
                self._epochs = p.add_task("epochs", total=event.max_epochs, info="")
            done = (
                event.current_epoch
                if event.kind is ProgressKind.EPOCH_END
                else max(0, event.current_epoch - 1)
            )
            p.update(self._epochs, total=event.max_epochs, completed=done)
        elif event.kind is ProgressKind.STEP:
            total = event.total or None
            if self._steps is None:
                self._steps = p.add_task("steps", total=total, info="")
            p.update(
                self._steps, total=total, completed=event.current, info=printable(event.info[:MAX_INFO_SHOWN])
            )
        elif event.kind is ProgressKind.RUN_END and self._steps is not None:
            task = p.tasks[self._steps]
            if task.total is not None:
                p.update(self._steps, completed=task.total)


def print_outcome(outcome: Outcome, console: Console | None = None) -> None:
    """Print the outcome for a person: status, result or error, files, timings."""
    out = console or Console(file=sys.stdout)
    colour = "green" if outcome.ok else "red"
    out.print(
        Text.assemble(
            (outcome.status.value, f"bold {colour}"),
            f" task {printable(outcome.task_id)} ({printable(outcome.runtime)})",
        )
    )
    if outcome.ok:
        # Our own dump, not rich's print_json: that one re-encodes without
        # escaping, letting C1 controls and lone surrogates through.
        text = json.dumps(outcome.result, indent=2, ensure_ascii=False, default=repr)
        out.print(JSONHighlighter()(Text(printable(text, multiline=True))))
    elif outcome.error is not None:
        # One line: the traceback and stderr tail are in --json.
        out.print(Text(f"{printable(outcome.error.type)}: {printable(outcome.error.message)}"))
    if outcome.files:
        _print_files(out, outcome.files)
    if outcome.selection is not None:
        out.print(Text(selection_summary(outcome)))
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in outcome.timings.items())
    if phases:
        out.print(Text(f"timings: {phases}", style="dim"))


def _print_files(out: Console, files: dict[str, tuple[FileKind, str]]) -> None:
    failed = [(name, reason) for name, (kind, reason) in files.items() if kind == FileKind.FAILED]
    out.print(Text(f"files: {len(files) - len(failed)} processed, {len(failed)} failed"))
    for name, reason in failed[:MAX_FAILED_FILES_SHOWN]:
        out.print(Text(f"  {printable(name)}: {printable(reason)}"))
    if len(failed) > MAX_FAILED_FILES_SHOWN:
        out.print(Text(f"  … and {len(failed) - MAX_FAILED_FILES_SHOWN} more failed (see --json)"))


def selection_summary(outcome: Outcome) -> str:
    """One line: how many files the task saw out of how many, and why the rest were left out."""
    sel = outcome.selection or {}
    line = (
        f"data: {sel.get('selected', 0)} of {sel.get('total', 0)} file(s) selected; skipped "
        f"{sel.get('skipped_processed', 0)} already processed, {sel.get('skipped_failed', 0)} failed "
        f"before, {sel.get('over_limit', 0)} over the limit"
    )
    if sel.get("skipped_unusable"):
        line += f", {sel['skipped_unusable']} with a path too long for a data view"
    if outcome.batches is not None:
        line += f"; batches {outcome.batches['completed']} of {outcome.batches['total']} completed"
    if outcome.saved_rows:
        line += f"; {outcome.saved_rows} result row(s) saved"
    return line
