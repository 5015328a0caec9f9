"""Following a Docker container's output: its engine log, both streams, as it is written.

The engine's log is read, not the container's live pipes, so a slow reader
never slows the sandbox, keeps it alive or delays its removal.
"""

from __future__ import annotations

import calendar
import logging
import queue
import re
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterator

log = logging.getLogger(__name__)

# Log frames (at most 16 KiB each, the engine's own split) waiting between
# the follow threads and the consumer: the parent's memory bound per task.
FOLLOW_QUEUE_FRAMES = 64
# How often a follow thread blocked on a full queue looks whether its consumer went away.
_FOLLOW_POLL_S = 0.2


def follow_logs(api: Any, container_id: str) -> Iterator[tuple[str, bytes]]:
    """The container's ``(stream, chunk)`` pairs: a log follow per stream, merged through one bounded queue.

    ``api`` is docker-py's low-level client. See
    :meth:`executor.backends.docker.DockerBackend.follow_output` for what the
    iterator promises.
    """
    frames: queue.Queue[tuple[str, bytes] | None] = queue.Queue(maxsize=FOLLOW_QUEUE_FRAMES)
    gone = threading.Event()  # the consumer closed the iterator
    lock = threading.Lock()
    open_streams: list[Any] = []

    def put(item: tuple[str, bytes] | None) -> bool:
        while not gone.is_set():
            try:
                frames.put(item, timeout=_FOLLOW_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def logs(name: str, *, follow: bool, since: float | None) -> Any:
        kwargs: dict[str, Any] = {"stream": True, "follow": follow, "timestamps": True}
        if since is not None:
            kwargs["since"] = since
        stream = api.logs(container_id, stdout=name == "stdout", stderr=name == "stderr", **kwargs)
        with lock:
            if gone.is_set():
                _close_stream(stream)
                return iter(())
            open_streams.append(stream)
        return stream

    def pump(name: str) -> None:
        last: int | None = None  # the last message's time (ns), and how many had it
        at_last = 0
        try:
            for frame in logs(name, follow=True, since=None):
                stamp, payload = _unstamped(bytes(frame))
                if stamp is not None:
                    last, at_last = stamp, (at_last + 1 if stamp == last else 1)
                if not put((name, payload)):
                    return
            # The engine may end a follow before the container's last message
            # (an unterminated line, flushed at its exit) is in the log it
            # follows: read what came after the last message seen.
            skip = at_last
            since = None if last is None else last / 1e9 - 1.0
            for frame in logs(name, follow=False, since=since):
                stamp, payload = _unstamped(bytes(frame))
                if last is not None and stamp is not None:
                    if stamp < last:
                        continue
                    if stamp == last and skip:
                        skip -= 1
                        continue
                if not put((name, payload)):
                    return
        except Exception as exc:  # removed mid-stream, engine gone: the follow just ends
            log.debug("container %s: following its %s ended: %s", container_id[:12], name, _line(exc))
        put(None)

    for name in ("stdout", "stderr"):
        threading.Thread(
            target=pump, args=(name,), name=f"follow-{name}-{container_id[:12]}", daemon=True
        ).start()
    try:
        running = 2
        while running:
            item = frames.get()
            if item is None:
                running -= 1
            else:
                yield item
    finally:
        gone.set()
        with lock:
            for stream in open_streams:
                _close_stream(stream)


# The engine's time stamp on a log message: RFC 3339, up to nanoseconds (UTC, in practice).
_STAMP = re.compile(rb"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?(?:Z|([+-])(\d\d):(\d\d))")


def _unstamped(frame: bytes) -> tuple[int | None, bytes]:
    """``(nanoseconds since the epoch, message)`` of a frame the engine stamped; ``(None, frame)`` if not."""
    head, space, payload = frame.partition(b" ")
    match = _STAMP.fullmatch(head) if space else None
    if match is None:
        return None, frame
    seconds = calendar.timegm(time.strptime(match[1].decode(), "%Y-%m-%dT%H:%M:%S"))
    if match[3]:
        offset = int(match[4]) * 3600 + int(match[5]) * 60
        seconds -= offset if match[3] == b"+" else -offset
    return seconds * 1_000_000_000 + int((match[2] or b"").ljust(9, b"0")), payload


def _close_stream(stream: Any) -> None:
    """Close a docker-py log stream; its reading thread then ends."""
    try:
        stream.close()
    except Exception as exc:  # already closed by the engine's side
        log.debug("closing a log follow: %s", _line(exc))


def _line(exc: BaseException) -> str:
    """One line of an exception, for the debug log."""
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:300] if text.strip() else type(exc).__name__
