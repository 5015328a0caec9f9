"""Progress reporting a protocol gets as ``ctx.progress``: run and epoch boundaries, and coalesced steps."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import TYPE_CHECKING, Any

import grpc

from executor.sandbox.contract import MAX_INFO_CHARS, PROGRESS_STEP_INTERVAL_S, ReportCase
from executor.sandbox.errors import ReportRefused, _status
from executor.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from executor.sandbox.client import ParentClient


class Progress:
    """Progress events: they feed the operator's progress bars.

    Run and epoch boundaries go to the parent as they are reported. Steps
    are coalesced: at most one per
    :data:`~executor.sandbox.contract.PROGRESS_STEP_INTERVAL_S` is sent; one
    reported sooner waits, replaced by any later one, and is sent when the
    interval is up (from a thread of its own), before the next boundary, or
    before the result, whichever comes first. So ``step`` may be called
    every iteration of a tight loop: it costs a call only a few times a
    second, and the last step is never lost.
    """

    def __init__(self, client: ParentClient) -> None:
        self._client = client
        self._lock = threading.Lock()
        self._due = threading.Condition(self._lock)
        self._pending: dict[str, Any] | None = None
        self._last_step: float | None = None
        self._flusher: threading.Thread | None = None

    def _report(self, kind: str, **fields: Any) -> None:
        """Send one progress event.

        Raises:
            ReportRefused: The parent refused it or could not be reached.
        """
        try:
            self._client.report(ReportCase.PROGRESS, pb.ProgressEvent(kind=kind, **fields))
        except grpc.RpcError as exc:
            code, details = _status(exc)
            raise ReportRefused(f"progress event {kind} refused: {details}", code) from None

    def _boundary(self, kind: str, **fields: Any) -> None:
        """A run or epoch boundary: the step waiting (if any) first, then it."""
        self._client.count(progress=1)
        self.flush()
        self._report(kind, **fields)

    def flush(self) -> None:
        """Send the step that is waiting, if any (best effort: a later report supersedes it)."""
        with self._lock:
            fields, self._pending = self._pending, None
            if fields is not None:
                self._last_step = time.monotonic()
        if fields is not None:
            with contextlib.suppress(ReportRefused):
                self._report("STEP", **fields)

    def run_start(self) -> None:
        """The protocol's main work begins."""
        self._boundary("RUN_START")

    def run_end(self) -> None:
        """The protocol's main work is done."""
        self._boundary("RUN_END")

    def epoch_start(self, epoch: int, max_epochs: int) -> None:
        """Epoch ``epoch`` (1-based) of ``max_epochs`` begins."""
        self._boundary("EPOCH_START", current_epoch=epoch, max_epochs=max_epochs)

    def epoch_end(self, epoch: int, max_epochs: int) -> None:
        """Epoch ``epoch`` of ``max_epochs`` is done."""
        self._boundary("EPOCH_END", current_epoch=epoch, max_epochs=max_epochs)

    def step(
        self, current: int, total: int = 0, info: str = "", *, epoch: int = 0, max_epochs: int = 0
    ) -> None:
        """``current`` of ``total`` units done, with an optional short note (coalesced, see above).

        Raises:
            ReportRefused: ``info`` is not text (a lone surrogate), or the
                parent refused a step sent now or could not be reached.
        """
        info = info[:MAX_INFO_CHARS]
        try:
            info.encode("utf-8")
        except UnicodeEncodeError:
            raise ReportRefused("progress step refused: its info holds a lone surrogate") from None
        fields = {
            "current": current,
            "total": total,
            "info": info,
            "current_epoch": epoch,
            "max_epochs": max_epochs,
        }
        self._client.count(progress=1)  # every step counts as activity for the parent's stall watch
        with self._lock:
            now = time.monotonic()
            send_now = self._pending is None and (
                self._last_step is None or now - self._last_step >= PROGRESS_STEP_INTERVAL_S
            )
            if send_now:
                self._last_step = now
            else:
                self._pending = fields
                if self._flusher is None:
                    self._flusher = threading.Thread(
                        target=self._flush_when_due, name="progress", daemon=True
                    )
                    self._flusher.start()
                self._due.notify()
        if send_now:
            self._report("STEP", **fields)

    def _flush_when_due(self) -> None:
        """The flusher thread: a waiting step is sent once its interval is up."""
        while True:
            with self._lock:
                while self._pending is None:
                    self._due.wait()
                last = self._last_step if self._last_step is not None else 0.0
                wait = last + PROGRESS_STEP_INTERVAL_S - time.monotonic()
                if wait > 0:
                    self._due.wait(wait)
                    continue
            self.flush()
