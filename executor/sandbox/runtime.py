"""The sandbox's main loop: fetch the task, run the protocol, report, exit."""

from __future__ import annotations

import time

_T0 = time.monotonic()

import os  # noqa: E402
import sys  # noqa: E402

# Before grpc loads: its fork handlers, run whenever protocol code forks (a
# subprocess, multiprocessing) while the heartbeat thread is inside grpc,
# made the runtime exit with status 2 under gVisor in about one probe run in
# four. A forked child never uses the runtime's channel, which is what fork
# support exists for.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"

# asyncio (imported here and by grpc) imports ssl when it can, which is about
# a tenth of the runtime's boot; a sandbox has no network to use it on. It is
# blocked for these imports only: protocol code may still import ssl.
_SSL_BLOCKED = "ssl" not in sys.modules
if _SSL_BLOCKED:
    sys.modules["ssl"] = None  # type: ignore[assignment]

import argparse  # noqa: E402
import asyncio  # noqa: E402
import contextlib  # noqa: E402
import errno  # noqa: E402
import importlib.util  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import resource  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

import grpc  # noqa: E402

from executor.sandbox.client import ParentClient  # noqa: E402
from executor.sandbox.context import Context, TaskAborted  # noqa: E402
from executor.sandbox.contract import (  # noqa: E402
    BULK_SOCKET_NAME,
    EXIT_PARENT_GONE,
    FILE_SIZE_EXCEEDED,
    MAX_ERROR_MESSAGE_CHARS,
    MAX_ERROR_TYPE_CHARS,
    MAX_TRACEBACK_CHARS,
    MIN_HEARTBEAT_INTERVAL_MS,
    START_SOCKET_NAME,
    TOKEN_METADATA_KEY,
)
from executor.v1 import sandbox_pb2 as pb  # noqa: E402
from executor.v1 import sandbox_pb2_grpc as pb_grpc  # noqa: E402

if TYPE_CHECKING:
    from collections.abc import Iterator

if _SSL_BLOCKED and sys.modules.get("ssl", 0) is None:
    del sys.modules["ssl"]

SCRATCH_DIR = Path("/tmp/scratch")
CONNECT_TIMEOUT_S = 30.0
# A warm sandbox touches its connection this often while it waits (see _wait_for_task).
KEEP_CONNECTED_S = 45.0
# How long the runtime waits for the parent to confirm its first beat before
# it starts protocol code; a parent that never does has gone.
BEAT_SEEN_WAIT_S = 30.0


def _stderr(message: str) -> None:
    """Best effort: protocol code may have closed or replaced stderr."""
    with contextlib.suppress(Exception):
        sys.stderr.write(f"sandbox: {message}\n")
        sys.stderr.flush()


class Heartbeat:
    """Beats up from a thread of its own; applies control messages coming down."""

    def __init__(self, client: ParentClient, interval_s: float) -> None:
        self._client = client
        self._interval = interval_s
        self._stop = threading.Event()
        self._done = threading.Event()
        self.cancelled = threading.Event()
        self.seen = threading.Event()
        # The one record of the modeller's readiness: it may come before the
        # protocol's context exists (its TASK_START came before the sandbox
        # booted), and the context's mailbox is handed this same event.
        self.modeller_ready = threading.Event()
        self._main_ident = threading.main_thread().ident
        self._last_position: tuple[int, int] | None = None

    def _main_moved(self) -> bool:
        frame = sys._current_frames().get(self._main_ident or 0)
        position = (id(frame.f_code), frame.f_lineno) if frame is not None else (0, 0)
        moved = position != self._last_position
        self._last_position = position
        return moved

    def _beats(self) -> Iterator[pb.Beat]:
        seq = 0
        while True:
            seq += 1
            yield pb.Beat(
                seq=seq,
                progress_events=self._client.progress_events,
                mailbox_ops=self._client.mailbox_ops,
                main_thread_moved=self._main_moved(),
            )
            if self._stop.wait(self._interval):
                return

    def _listen(self) -> None:
        why = "the stream ended"
        try:
            for control in self._client.stub.Heartbeat(self._beats(), metadata=self._client.metadata):
                kind = pb.Control.Kind.Name(control.kind)
                if kind == "BEAT_SEEN":
                    self.seen.set()
                elif kind == "MODELLER_READY":
                    self.modeller_ready.set()
                elif kind == "CANCEL":
                    self.cancelled.set()
                    # A real signal, aimed at the main thread, so that a blocking
                    # call there (sleep, select) is interrupted too.
                    signal.pthread_kill(self._main_ident or 0, signal.SIGINT)
        except grpc.RpcError as exc:
            why = exc.code().name
        except BaseException as exc:  # whatever broke the stream, the parent is out of reach
            why = type(exc).__name__
        finally:
            self._done.set()
            if not self._stop.is_set():
                # No sandbox outlives its parent; nothing may stand between
                # this thread and the exit (init enforces it too, see init.py).
                try:
                    _stderr(f"lost the parent ({why}); exiting")
                finally:
                    os._exit(EXIT_PARENT_GONE)

    def start(self) -> None:
        """Start beating."""
        threading.Thread(target=self._listen, name="heartbeat", daemon=True).start()

    def stop(self) -> None:
        """Stop beating; the stream closes."""
        self._stop.set()

    def wait_seen(self, timeout: float) -> bool:
        """Whether the parent confirmed a beat within ``timeout`` seconds."""
        return self.seen.wait(timeout)


# How a protocol's log records read on stderr unless it configures logging itself.
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
_basic_config = logging.basicConfig


def _basic_config_with_our_format(**kwargs: Any) -> None:
    """``logging.basicConfig`` with :data:`LOG_FORMAT` as its default format."""
    if "format" not in kwargs and kwargs.get("style", "%") == "%":
        kwargs["format"] = LOG_FORMAT
    _basic_config(**kwargs)


def _configure_logging() -> None:
    """Let what a protocol logs at INFO and above reach stderr, which the parent follows.

    Ours is the handler :mod:`logging` falls back on when a record finds no
    handler at all (``logging.lastResort``, by default WARNING and the bare
    message), so a protocol that configures logging itself (``basicConfig``,
    its own handlers) gets exactly what it configured: nothing doubled,
    nothing overridden. ``logging.info()`` and its siblings configure the
    root logger on first use (a bare ``basicConfig()``); that default takes
    our format too, so one task's lines read alike. Called before any
    protocol code is loaded, so what it logs on import is kept too.
    """
    # The stderr of now, which the parent follows, even if protocol code replaces sys.stderr.
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.lastResort = handler
    logging.basicConfig = _basic_config_with_our_format
    logging.getLogger().setLevel(logging.INFO)


def _load_protocol(config: pb.TaskConfig) -> Any:
    bundle = Path(config.protocol_path)
    entry = bundle / f"{config.entry_module}.py"
    sys.path.insert(0, str(bundle))
    spec = importlib.util.spec_from_file_location(config.entry_module, entry)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {entry.name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[config.entry_module] = module
    spec.loader.exec_module(module)
    run = getattr(module, "run", None)
    if not callable(run):
        raise TypeError(f"{entry.name} defines no callable run(ctx)")
    return run


def _wire_text(text: object) -> str:
    """``text`` as a string protobuf accepts: lone surrogates become ``?``."""
    return str(text).encode("utf-8", "replace").decode("utf-8")


def _describe(exc: BaseException) -> str:
    """The exception's message; a hostile ``__str__`` cannot stop the report."""
    try:
        return _wire_text(exc)
    except BaseException:
        return f"<{type(exc).__name__} whose message could not be read>"


def _summarise(exc: BaseException) -> str:
    try:
        text = "".join(traceback.format_exception(exc))
    except BaseException:
        return ""
    return _wire_text(text[-MAX_TRACEBACK_CHARS:])


def _execute(config: pb.TaskConfig, ctx: Context, timings: dict[str, float]) -> pb.FinishRequest:
    """Load and run the protocol; never raises."""
    phase = "load"
    try:
        t = time.monotonic()
        run = _load_protocol(config)
        timings["load"] = time.monotonic() - t
        phase = "run"
        t = time.monotonic()
        value = run(ctx)
        if inspect.isawaitable(value):
            value = asyncio.run(_await(value))
        timings["run"] = time.monotonic() - t
        try:
            result_json = json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            return _error("ResultNotSerialisable", f"run() returned a value that is not JSON: {exc}", "")
        if len(result_json.encode()) > config.max_result_bytes:
            return _error(
                "ResultTooLarge",
                f"the result is {len(result_json.encode())} bytes; the limit is {config.max_result_bytes}",
                "",
            )
        return pb.FinishRequest(status=pb.Status.OK, result_json=result_json)
    except TaskAborted as exc:
        timings.setdefault(phase, time.monotonic() - t)
        return _error(exc.reason or "TaskAborted", _describe(exc), "", status=pb.Status.ABORT)
    except BaseException as exc:  # the protocol's failure, whatever it is, is the result
        timings.setdefault(phase, time.monotonic() - t)
        if _file_too_large(exc):
            return _error(
                FILE_SIZE_EXCEEDED,
                f"a write passed the policy's file size limit ({_fsize_limit()}): {_describe(exc)}",
                _summarise(exc),
            )
        return _error(type(exc).__name__, _describe(exc), _summarise(exc))


def _file_too_large(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) is a write refused past RLIMIT_FSIZE (EFBIG)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.EFBIG:
            return True
        current = current.__cause__ or current.__context__
    return False


def _fsize_limit() -> str:
    """RLIMIT_FSIZE in words (the policy's ``file_size_mb``)."""
    try:
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    except (OSError, ValueError):
        return "unknown"
    return "none" if soft == resource.RLIM_INFINITY else f"{soft} bytes"


async def _await(awaitable: Any) -> Any:
    return await awaitable


def _error(kind: str, message: str, tb: str, status: pb.Status = pb.Status.ERROR) -> pb.FinishRequest:
    return pb.FinishRequest(
        status=status,
        error=pb.ErrorInfo(
            type=_wire_text(kind)[:MAX_ERROR_TYPE_CHARS],
            message=_wire_text(message)[:MAX_ERROR_MESSAGE_CHARS],
            traceback=tb,
        ),
    )


def _preload(modules: str) -> None:
    """Import the policy's ``preload`` modules; one that fails is named and skipped.

    Runs before the task is known (in a warm sandbox, long before), so a
    protocol that imports them later finds them in ``sys.modules``.
    """
    for name in filter(None, modules.split(",")):
        try:
            importlib.import_module(name)
        except BaseException as exc:  # a broken module must not cost the task its sandbox
            _stderr(f"preload: cannot import {name}: {type(exc).__name__}: {_describe(exc)}")


def _wait_for_task(path: Path, client: ParentClient) -> tuple[pb.TaskConfig, socket.socket] | None:
    """Block on the start line until the parent sends the task's configuration; ``None`` if it never will.

    A blocked read costs nothing while the sandbox waits, however long. The
    connection to the parent is opened first, and touched every
    :data:`KEEP_CONNECTED_S` (the parent closes one idle for a minute), so
    the task's first calls find it open. The line is returned open, for the
    first beat (:func:`_first_beat`).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        _touch(client)
        sock.connect(str(path))
        sock.settimeout(KEEP_CONNECTED_S)
        while True:
            try:
                go = sock.recv(1)
                break
            except TimeoutError:
                _touch(client)
        if go != b"\x01":
            _stderr("the parent let this warm sandbox go without a task; exiting")
            sock.close()
            return None
        sock.settimeout(CONNECT_TIMEOUT_S)
        size = int.from_bytes(_read_exactly(sock, 4), "big")
        return pb.TaskConfig.FromString(_read_exactly(sock, size)), sock
    except (OSError, ValueError) as exc:  # ValueError: a short read, or a configuration that does not parse
        _stderr(f"cannot wait for the task: {type(exc).__name__}: {exc}")
        sock.close()
        return None


def _first_beat(line: socket.socket, heartbeat: Heartbeat) -> None:
    """The first beat over the start line, a byte each way; the line is closed after, whatever happens.

    Its confirmation counts as the heartbeat stream's: without it (a hang-up)
    the runtime waits for the stream's own, as a cold one does.
    """
    try:
        line.sendall(b"\x02")
        if line.recv(1) == b"\x03":
            heartbeat.seen.set()
    except OSError:
        pass
    finally:
        line.close()


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    parts: list[bytes] = []
    while n:
        data = sock.recv(min(n, 1 << 20))
        if not data:
            raise ValueError("the start line ended early")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def _touch(client: ParentClient) -> None:
    """One call that opens (or keeps open) the connection; "no task yet" is its expected answer."""
    with contextlib.suppress(grpc.RpcError):
        client.stub.GetTask(
            pb.GetTaskRequest(no_wait=True),
            metadata=client.metadata,
            timeout=CONNECT_TIMEOUT_S,
            wait_for_ready=True,
        )


def main(argv: list[str] | None = None) -> int:
    """Run one task and return the process exit status."""
    parser = argparse.ArgumentParser(prog="python3 -m executor.sandbox")
    parser.add_argument("--socket", required=True, help="the parent's Unix socket")
    parser.add_argument("--token-file", required=True, help="file holding this task's token")
    parser.add_argument("--preload", default="", help="modules to import first, comma-separated")
    parser.add_argument(
        "--wait-for-task",
        action="store_true",
        help="a warm sandbox: wait on the start line for a task as long as the parent lives",
    )
    args = parser.parse_args(argv)
    # A cancel reaches protocol code as SIGINT (see Heartbeat._listen), which
    # must raise KeyboardInterrupt here. Python installs that handler only when
    # it starts with SIGINT at its default; one ignored by whatever launched
    # the sandbox (a shell's background job, nohup, a CI runner) stays ignored
    # across init's fork and exec, and every cancel would then end in a kill.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _configure_logging()
    if args.preload:
        _preload(args.preload)
    # A warm sandbox imports before its task exists: that time is not the task's.
    timings: dict[str, float] = {} if args.wait_for_task else {"import": time.monotonic() - _T0}

    token = Path(args.token_file).read_text().strip()
    metadata = ((TOKEN_METADATA_KEY, token),)
    # The parent is trusted and enforces the caps on what we send, so only our
    # receive limit needs lifting (a configuration may carry a large protocol).
    channel = grpc.insecure_channel(
        f"unix:{args.socket}",
        options=[
            ("grpc.enable_http_proxy", 0),
            ("grpc.enable_retries", 0),
            ("grpc.max_receive_message_length", -1),
        ],
    )
    stub = pb_grpc.SandboxStub(channel)
    client = ParentClient(stub, metadata, str(Path(args.socket).parent / BULK_SOCKET_NAME))
    ctx: Context | None = None
    start_line: socket.socket | None = None
    if args.wait_for_task:
        # A warm sandbox: the configuration comes down the start line.
        waited = _wait_for_task(Path(args.socket).parent / START_SOCKET_NAME, client)
        if waited is None:
            return EXIT_PARENT_GONE
        config, start_line = waited
    else:
        t = time.monotonic()
        try:
            # wait_for_ready rather than channel_ready_future: the latter leaves a
            # connectivity poll behind that delays channel.close() by ~0.2 s.
            config = stub.GetTask(
                pb.GetTaskRequest(), metadata=metadata, timeout=CONNECT_TIMEOUT_S, wait_for_ready=True
            )
        except grpc.RpcError as exc:
            _stderr(f"cannot fetch the task from the parent: {exc}")
            return EXIT_PARENT_GONE
        timings["config"] = time.monotonic() - t
    heartbeat = Heartbeat(client, max(config.heartbeat_interval_ms, MIN_HEARTBEAT_INTERVAL_MS) / 1000)
    heartbeat.start()
    if start_line is not None:
        # Beside the stream: whichever confirmation comes first lets the protocol start.
        threading.Thread(
            target=_first_beat, args=(start_line, heartbeat), name="first-beat", daemon=True
        ).start()

    SCRATCH_DIR.mkdir(mode=0o700, exist_ok=True)
    # Not a line of protocol code (not even its import) before the parent has
    # seen a beat: from then on any freeze is caught by the heartbeat timeout.
    if not heartbeat.wait_seen(BEAT_SEEN_WAIT_S):
        _stderr(f"the parent saw no heartbeat within {BEAT_SEEN_WAIT_S:g} s; exiting")
        return EXIT_PARENT_GONE
    try:
        ctx = Context(config, client, SCRATCH_DIR, modeller_ready=heartbeat.modeller_ready)
        report = _execute(config, ctx, timings)
    except BaseException as exc:  # even a broken configuration must be reported
        report = _error(type(exc).__name__, _describe(exc), _summarise(exc))
    if ctx is not None:
        # ctx.progress coalesces steps: one still waiting goes before the result.
        with contextlib.suppress(Exception):
            ctx.progress.flush()
    if heartbeat.cancelled.is_set() and report.status == pb.Status.ERROR:
        report = _error("Cancelled", "the task was cancelled", "")
    report.timings.update(timings)
    heartbeat.stop()
    try:
        # Through call(): a protocol that just spent the call budget must not
        # lose its result to the rate cap (the refusal is retried after a back-off).
        client.call(lambda: client.stub.Finish(report, metadata=metadata, timeout=CONNECT_TIMEOUT_S))
    except grpc.RpcError as exc:
        _stderr(f"could not report the result: {exc.code().name}: {exc.details()}")
        return 1
    finally:
        channel.close()
    return 0
