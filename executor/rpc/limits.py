"""How much a task may ask of its server: call budgets, open-call slots, request deadlines and caps.

A flood or a pile of half-open streams hurts only the task that makes it.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from executor.rpc import SERVICE_NAME
from executor.rpc.checks import RequestRejected
from executor.sandbox.contract import CHUNK_BYTES as CHUNK_BYTES  # pinned with the caps below
from executor.sandbox.contract import (
    MAX_OPEN_RECEIVES,
    MAX_OPEN_SENDS,
    MAX_OPEN_SHARE_RECEIVES,
    RATE_LIMITED_TRAILER,
    ReportCase,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# The public messages of a refusal for calling too fast; the child recognises
# such a refusal by the contract's trailer, never by this text.
RATE_LIMITED = "call rate limit exceeded"
PROGRESS_RATE_LIMITED = "progress rate limit exceeded"
_RATE_REFUSALS = frozenset({RATE_LIMITED, PROGRESS_RATE_LIMITED})

MAX_METADATA_BYTES = 8 * 1024
# Per task: calls per second (sustained) and burst, and how many calls of a
# kind may be open at once. A flood or a pile of half-open streams hurts
# only the task that makes it, and not even its other calls.
RATE_PER_S = 1000.0
RATE_BURST = 2000
CONCURRENCY: dict[str, int] = {
    f"/{SERVICE_NAME}/Heartbeat": 1,
    f"/{SERVICE_NAME}/SendMessage": MAX_OPEN_SENDS,
    f"/{SERVICE_NAME}/ReceiveMessage": MAX_OPEN_RECEIVES,
    f"/{SERVICE_NAME}/GetSecureShares": MAX_OPEN_SHARE_RECEIVES,
    f"/{SERVICE_NAME}/Mailbox": 1,
}
# Work inside a call is charged to the same bucket as calls, so that a
# stream of messages costs what as many calls would: each chunk of a
# mailbox body after the first, each FILES_PER_TOKEN file outcomes and each
# ROWS_PER_TOKEN result rows. A full call of rows (1000) costs 101 of the
# burst, and the task's whole row cap (100,000) ten seconds of its rate.
FILES_PER_TOKEN = 10
ROWS_PER_TOKEN = 10


@dataclass(frozen=True)
class ReportCharge:
    """What one Report call of a case costs besides the call itself.

    Attributes:
        items_per_token: Each this many items of its lists (file outcomes,
            rows) cost one more token of the call budget; 0 for none.
        event: Whether it is an event for every hook, charged to the event
            bucket (:data:`PROGRESS_PER_S`) too.
    """

    items_per_token: int = 0
    event: bool = False


# The per-case charge of the Report call. A case not listed is an event for
# every hook, charged as progress is: the strictest charge, so a new kind
# cannot slip past the budget.
REPORT_CHARGES: dict[str, ReportCharge] = {
    ReportCase.PROGRESS: ReportCharge(event=True),
    ReportCase.FILES: ReportCharge(items_per_token=FILES_PER_TOKEN),
    ReportCase.ROWS: ReportCharge(items_per_token=ROWS_PER_TOKEN),
}
DEFAULT_REPORT_CHARGE = ReportCharge(event=True)

# Beats have a bucket of their own: the runtime beats at most every 50 ms.
BEATS_PER_S = 25.0
BEAT_BURST = 50
# Progress reports are charged as calls and, besides, to a bucket of their
# own: each costs the parent a call's work (0.4 to 1.5 ms of a core here,
# with the load) and an event for every hook, so at the call rate alone a
# protocol reporting in a tight loop took half a core of the parent
# (bench/progress_cost.py). The child sends steps at most every
# PROGRESS_STEP_INTERVAL_S (4 a second) and run and epoch boundaries as they
# come, well within this unless its epochs last under a tenth of a second;
# past it a report is refused with the rate-limit signal and the child
# retries it after a pause, so an eager protocol is slowed, not failed, and
# cannot starve its own mailbox calls.
PROGRESS_PER_S = 20.0
PROGRESS_BURST = 100
# A task that keeps calling or streaming after its bucket is empty abuses the
# parent (each refusal still costs it work, outside the sandbox's CPU cap):
# past this many refusals, forgiven at ABUSE_FORGIVE_PER_S, all its
# connections are closed and the task ends as an error.
ABUSE_REFUSALS = 5000
ABUSE_FORGIVE_PER_S = 500.0
ABUSE_ERROR_TYPE = "RpcAbuse"
# A call must send its (first) request message this soon after its headers,
# and a body's chunks may pause at most STREAM_GAP_S: a call waiting for a
# message holds a server thread. A request normally arrives with its
# headers; at most MAX_AWAITING_REQUESTS calls of a task may still be waiting
# after REQUEST_GRACE_S (a busy parent may take that long to read one), and
# any more are cancelled then.
REQUEST_WAIT_S = 5.0
REQUEST_GRACE_S = 1.0
STREAM_GAP_S = 60.0
MAX_AWAITING_REQUESTS = 8
WATCH_TICK_S = 0.25
# A connection that carries no open call for this long is closed (grpc counts
# a connection with an open call, such as the runtime's heartbeat stream, as
# busy, so a call in progress is never cut off by this).
IDLE_CONNECTION_MS = 60_000
# Connections one task may hold open: the runtime needs one. Without a cap a
# protocol could exhaust the parent's file descriptors, which all tasks share.
MAX_CONNECTIONS = 8
HANDSHAKE_TIMEOUT_MS = 5_000
ENVELOPE_HEADROOM = 64 * 1024
# Streams one connection may have open at once.
MAX_STREAMS_PER_CONNECTION = 12
# Enough threads for every call the caps let block at once (the concurrency
# caps above, plus the calls awaiting their request) and a few more. Calls
# beyond wait for a thread in order rather than being refused, so a burst of
# stalled calls delays Finish briefly but cannot refuse it; what may wait is
# bounded by the streams a task's connections may carry.
SERVER_THREADS = sum(CONCURRENCY.values()) + MAX_AWAITING_REQUESTS + 8
MAX_CONCURRENT_RPCS = MAX_CONNECTIONS * MAX_STREAMS_PER_CONNECTION


def rate_limit_trailers(refused: str) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a refusal: the contract's rate-limit signal if it is only the rate."""
    return ((RATE_LIMITED_TRAILER, "1"),) if refused in _RATE_REFUSALS else ()


def refusal(refused: str) -> RequestRejected:
    """A RESOURCE_EXHAUSTED rejection for a budget refusal, with its trailers."""
    return RequestRejected("RESOURCE_EXHAUSTED", refused, trailers=rate_limit_trailers(refused))


class _Bucket:
    """A token bucket (not locked: its owner holds a lock)."""

    def __init__(self, rate_per_s: float, burst: float) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self.tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self, cost: float) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self.tokens < cost:
            return False
        self.tokens -= cost
        return True


class CallLimiter:
    """One task's budget: calls and the work inside them, open calls, and abuse.

    Args:
        rate_per_s: Calls (and units of work) per second, sustained.
        burst: How many may come at once.
        on_abuse: Called once, with a public reason, when the task keeps
            coming after refusals (see :data:`ABUSE_REFUSALS`).
    """

    def __init__(
        self,
        rate_per_s: float = RATE_PER_S,
        burst: int = RATE_BURST,
        on_abuse: Callable[[str], None] | None = None,
    ) -> None:
        self._calls = _Bucket(rate_per_s, burst)
        self._beats = _Bucket(BEATS_PER_S, BEAT_BURST)
        self._progress = _Bucket(PROGRESS_PER_S, PROGRESS_BURST)
        self._open: dict[str, int] = {}
        self._refusals = 0.0
        self._refusals_stamp = time.monotonic()
        self._on_abuse = on_abuse
        self.abusive = False
        self._lock = threading.Lock()

    def _refuse(self, reason: str) -> str:
        """Count a refusal (lock held); return ``reason``."""
        now = time.monotonic()
        forgiven = (now - self._refusals_stamp) * ABUSE_FORGIVE_PER_S
        self._refusals = max(0.0, self._refusals - forgiven) + 1
        self._refusals_stamp = now
        if self._refusals > ABUSE_REFUSALS and not self.abusive:
            self.abusive = True
            if self._on_abuse is not None:
                threading.Thread(
                    target=self._on_abuse,
                    args=(f"the sandbox kept calling after more than {ABUSE_REFUSALS} refusals",),
                    name="rpc-abuse",
                    daemon=True,
                ).start()
        return reason

    def take(self) -> str | None:
        """Charge one call to the bucket; the reason it is refused, or ``None``."""
        return self.charge(1)

    def charge(self, units: float) -> str | None:
        """Charge ``units`` of work inside a call; the reason it is refused, or ``None``."""
        if units <= 0:
            return None
        with self._lock:
            return None if self._calls.take(units) else self._refuse(RATE_LIMITED)

    def beat(self) -> str | None:
        """Charge one heartbeat; the reason it is refused, or ``None``."""
        with self._lock:
            return None if self._beats.take(1) else self._refuse("heartbeat rate limit exceeded")

    def progress(self) -> str | None:
        """Charge one progress report to its own bucket; the reason it is refused, or ``None``."""
        with self._lock:
            return None if self._progress.take(1) else self._refuse(PROGRESS_RATE_LIMITED)

    def report(self, case: str, items: int) -> str | None:
        """Charge a Report of ``case`` holding ``items`` items; the reason it is refused, or ``None``."""
        charge = REPORT_CHARGES.get(case, DEFAULT_REPORT_CHARGE)
        if charge.items_per_token:
            refused = self.charge(items // charge.items_per_token)
            if refused is not None:
                return refused
        return self.progress() if charge.event else None

    def open(self, method: str) -> str | None:
        """Take a slot for an open call to ``method``; the reason it is refused, or ``None``."""
        with self._lock:
            cap = CONCURRENCY.get(method)
            if cap is not None and self._open.get(method, 0) >= cap:
                return self._refuse(f"at most {cap} {method.rsplit('/', 1)[-1]} call(s) may be open at once")
            self._open[method] = self._open.get(method, 0) + 1
            return None

    def release(self, method: str) -> None:
        """Give back the slot of a finished call."""
        with self._lock:
            self._open[method] -= 1


class RequestWatch:
    """Cancels calls whose next request message is overdue (one thread, started lazily).

    A call that sent its headers but never its message would otherwise hold
    a server thread for as long as its client likes. A first request that
    has not come after :data:`REQUEST_GRACE_S` counts as awaited; past
    :data:`MAX_AWAITING_REQUESTS` such calls, more are cancelled at once.
    """

    def __init__(self) -> None:
        # key -> [deadline, context, when it counts as awaited (or None), counted]
        self._due: dict[int, list[Any]] = {}
        self._keys = itertools.count()
        self._awaiting = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def next(
        self,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
        within_s: float | None,
        first: bool = False,
    ) -> Any:
        """The next item of ``requests``, cancelling the call if it takes longer than ``within_s``.

        Raises:
            StopIteration: The client sent no more.
            grpc.RpcError: The call was cancelled (by its client, or here).
        """
        if within_s is None:
            return next(requests)
        with self._lock:
            key = next(self._keys)
            now = time.monotonic()
            self._due[key] = [now + within_s, context, now + REQUEST_GRACE_S if first else None, False]
            if self._thread is None:
                self._thread = threading.Thread(target=self._watch, name="rpc-request-watch", daemon=True)
                self._thread.start()
        try:
            return next(requests)
        finally:
            with self._lock:
                entry = self._due.pop(key, None)
                if entry is not None and entry[3]:
                    self._awaiting -= 1

    def _watch(self) -> None:
        while not self._stop.wait(WATCH_TICK_S):
            now = time.monotonic()
            cancel = []
            with self._lock:
                for key, entry in list(self._due.items()):
                    deadline, context, counts_at, counted = entry
                    due_to_count = counts_at is not None and not counted and counts_at <= now
                    if deadline <= now or (due_to_count and self._awaiting >= MAX_AWAITING_REQUESTS):
                        del self._due[key]
                        if counted:
                            self._awaiting -= 1
                        cancel.append(context)
                    elif due_to_count:
                        entry[3] = True
                        self._awaiting += 1
            for context in cancel:
                context.cancel()

    def stop(self) -> None:
        """Stop watching."""
        self._stop.set()


def guarded(
    handler: grpc.RpcMethodHandler[Any, Any], limiter: CallLimiter, watch: RequestWatch, method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """``handler``, reading and parsing its own requests, within the task's budget.

    Every method is served as a request stream, so this code, not grpc, reads
    the request: a call whose request does not come within
    :data:`REQUEST_WAIT_S` is cancelled, which frees its thread and slot.
    Requests are parsed here, so a malformed one is refused with
    INVALID_ARGUMENT by our own code (grpc's failed-deserialisation path
    leaves streams behind on the connection). Each message inside a stream is
    charged to the task's budget. The concurrency slot is taken only once the
    handler really runs, so a call grpc refuses earlier (too large, over the
    server's concurrency cap) cannot leak one.
    """
    parse: Callable[[bytes], Any] = handler.request_deserializer or (lambda raw: raw)
    kwargs: dict[str, Any] = {
        "request_deserializer": None,
        "response_serializer": handler.response_serializer,
    }
    is_heartbeat = method == f"/{SERVICE_NAME}/Heartbeat"
    # The heartbeat and the mailbox stream live as long as the task and may
    # idle between messages; each is one per task (CONCURRENCY).
    gap = None if is_heartbeat or method == f"/{SERVICE_NAME}/Mailbox" else STREAM_GAP_S

    def parsed(raw: bytes) -> Any:
        try:
            return parse(raw)
        except Exception:
            raise RequestRejected("INVALID_ARGUMENT", "malformed request") from None

    def first_raw(raws: Iterator[bytes], context: grpc.ServicerContext) -> bytes | None:
        try:
            raw: bytes = watch.next(raws, context, REQUEST_WAIT_S, first=True)
        except StopIteration:
            return None
        return raw

    def stream_of(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        raw = first_raw(raws, context)
        index = 0
        while raw is not None:
            refused = limiter.beat() if is_heartbeat else limiter.charge(1 if index else 0)
            if refused is not None:
                raise refusal(refused)
            yield parsed(raw)
            index += 1
            try:
                raw = watch.next(raws, context, gap)
            except StopIteration:
                return

    def request_of(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        raw = first_raw(raws, context)
        if raw is None:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected a request message")
        try:
            return parsed(raw)
        except RequestRejected as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.public_message)

    def first(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
        if handler.request_streaming:
            return stream_of(raws, context)
        return request_of(raws, context)

    def enter(context: grpc.ServicerContext) -> None:
        refused = limiter.open(method)
        if refused is not None:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)

    if not handler.response_streaming:
        behaviour = handler.unary_unary or handler.stream_unary
        assert behaviour is not None

        def once(raws: Iterator[bytes], context: grpc.ServicerContext) -> Any:
            request = first(raws, context)
            enter(context)
            try:
                return behaviour(request, context)
            finally:
                limiter.release(method)

        return grpc.stream_unary_rpc_method_handler(once, **kwargs)
    streaming = handler.unary_stream or handler.stream_stream
    assert streaming is not None

    def stream(raws: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[Any]:
        request = first(raws, context)
        enter(context)
        try:
            yield from streaming(request, context)
        finally:
            limiter.release(method)

    return grpc.stream_stream_rpc_method_handler(stream, **kwargs)
