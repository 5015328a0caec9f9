"""Human output for the CLI: progress bars fed by the protocol's progress events."""

from __future__ import annotations

import json
import sys
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from executor.outcome import Outcome
from executor.session import ProgressUpdate


class ProgressDisplay:
    """Draws an epoch bar and a step bar on stderr as events arrive."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
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
        if event.kind in ("EPOCH_START", "EPOCH_END") and event.max_epochs:
            if self._epochs is None:
                self._epochs = p.add_task("epochs", total=event.max_epochs, info="")
            done = event.current_epoch if event.kind == "EPOCH_END" else max(0, event.current_epoch - 1)
            p.update(self._epochs, total=event.max_epochs, completed=done)
        elif event.kind == "STEP":
            total = event.total or None
            if self._steps is None:
                self._steps = p.add_task("steps", total=total, info="")
            p.update(self._steps, total=total, completed=event.current, info=event.info[:60])
        elif event.kind == "RUN_END" and self._steps is not None:
            task = p.tasks[self._steps]
            if task.total is not None:
                p.update(self._steps, completed=task.total)


def print_outcome(outcome: Outcome, console: Console | None = None) -> None:
    """Print the outcome for a person: status, result or error, timings."""
    out = console or Console(file=sys.stdout)
    colour = "green" if outcome.ok else "red"
    out.print(f"[bold {colour}]{outcome.status.value}[/] task {outcome.task_id} ({outcome.runtime})")
    if outcome.ok:
        out.print_json(json.dumps(outcome.result))
    elif outcome.error is not None:
        out.print(f"{outcome.error.type}: {outcome.error.message}", markup=False, highlight=False)
    phases = ", ".join(f"{k} {v:.2f}s" for k, v in outcome.timings.items())
    if phases:
        out.print(f"[dim]timings: {phases}[/]")
