"""Human output for the CLI: progress bars fed by the protocol's progress events.

Every string here that came from the sandbox passes through
:func:`executor.cli.terminal.printable` and is printed as plain text, never as rich
markup.
"""

from __future__ import annotations

import json
import sys
from types import TracebackType

from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.text import Text

from executor.cli.terminal import printable
from executor.events import ProgressKind, ProgressUpdate
from executor.fileoutcomes import FileKind
from executor.outcome import Outcome

MAX_INFO_SHOWN = 60
MAX_FAILED_FILES_SHOWN = 5


class ProgressDisplay:
    """Draws an epoch bar and a step bar on stderr as events arrive."""

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

    def update(self, event: ProgressUpdate) -> None:
        """Apply one progress event (called from a server thread)."""
        p = self._progress
        if not self._started:
            self._started = True
            p.start()
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
