"""A scripted container engine for unit tests (never imported by the executor itself).

:class:`FakeBackend` implements :class:`~executor.backends.ContainerBackend`
without an engine. Each container runs a *program* in a thread of its own
from :meth:`~FakeBackend.start` on: a callable that plays the sandbox and
returns how the container ends. Ready-made programs script the ends the
supervisor must tell apart::

    exits(3, stderr="boom")     exits by itself with status 3
    prints(("stdout", "hi"))    writes output (``follow_output`` yields it), then exits 0
    out_of_memory()             killed by the kernel's OOM killer (137, OOMKilled)
    killed_from_outside()       SIGKILLed by someone other than the executor (137)
    hangs()                     never exits until killed
    lost()                      the engine loses track of it (``wait`` raises)
    host_runtime(scratch)       runs the real init and child runtime as host processes
                                (:mod:`executor.testing.hostrun`)

What a program writes (:meth:`FakeContainer.write`) is what
:meth:`FakeBackend.follow_output` yields, from the container's start until it
ends, as an engine's log follow does.

Engine errors are scripted per call (``create_errors``, ``start_errors``: one
entry per call, ``None`` for a call that succeeds), and every call is recorded
in :attr:`FakeBackend.calls` so a test can assert that each container was
removed. Like any fake engine it proves supervision logic only, never
isolation: :func:`host_runtime` runs protocol code on the host, unconfined.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from executor.backends import (
    IMAGE_FIX,
    LABEL_MANAGED,
    LABEL_WIRE,
    ContainerSpec,
    EngineInfo,
    ExitInfo,
    RuntimeInfo,
    Scheduling,
    Usage,
    check_image_labels,
    register_backend,
)
from executor.errors import ContainerError, ImageNotFoundError
from executor.policy import Isolation, IsolationPolicy
from executor.sandbox.contract import WIRE_VERSION

# What an engine reports for a container ended by SIGKILL (128 + 9).
SIGKILL_EXIT = 137
# Output one fake container keeps for its followers (the engine's log is
# capped too); writes beyond it are counted in FakeContainer.output_dropped.
MAX_OUTPUT_BYTES = 16 * 1024 * 1024
# Characters of stderr kept for stderr_tail.
MAX_STDERR_CHARS = 64 * 1024
OUTPUT_STREAMS = ("stdout", "stderr")

Program = Callable[["FakeContainer"], "ExitInfo | None"]

# What the fake engine says about itself: a runtime for every isolation, each applying seccomp.
FAKE_ENGINE = EngineInfo("Fake", "0", "2", tuple(RuntimeInfo(i.value, i) for i in Isolation))
# The labels of an image the fake has, unless a test gives others: built by this checkout.
BUILT_HERE = {LABEL_WIRE: str(WIRE_VERSION)}


class FakeContainer:
    """One fake container: its spec, its program's thread and how it ended.

    Attributes:
        id: The container id.
        spec: What it was created from.
        stderr: What ``stderr_tail`` returns; a program may set it, or
            :meth:`write` to it.
        output_dropped: Bytes written past :data:`MAX_OUTPUT_BYTES`, not kept.
        killed: Whether a kill (or a forced remove) ended it while it ran.
        removed: Whether it was removed.
    """

    def __init__(self, container_id: str, spec: ContainerSpec) -> None:
        self.id = container_id
        self.spec = spec
        self.stderr = ""
        self.killed = False
        self.removed = False
        # What the container "used", as its cgroup would say; a program sets
        # them (None: the host cannot tell, as for a backend without cgroups).
        # cpu_s may be a function of nothing (e.g. of the clock), read at each
        # usage call, so that a test's CPU does not depend on thread scheduling.
        self.cpu_s: float | Callable[[], float] | None = None
        self.oom_kills: int | None = None
        self.pids_refused: int | None = None
        self.usage_reads = 0
        # How its threads stand with the scheduler when a silent sandbox is
        # judged (None: the host cannot tell); a function is read at each call.
        self.scheduling: Scheduling | Callable[[], Scheduling] | None = None
        self.started = threading.Event()
        self._ended = threading.Event()
        self._kill_requested = threading.Event()
        self._exit: ExitInfo | None = None
        self._lost: BaseException | None = None
        self._lock = threading.Lock()
        self._on_kill: list[Callable[[], None]] = []
        self._output: list[tuple[str, bytes]] = []
        self._output_bytes = 0
        self.output_dropped = 0
        self._output_changed = threading.Condition()

    @property
    def running(self) -> bool:
        """Started and not yet ended."""
        return self.started.is_set() and not self._ended.is_set()

    @property
    def exit_info(self) -> ExitInfo | None:
        """How it ended, once it has."""
        return self._exit

    def on_kill(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` when the container is killed (e.g. to kill host processes)."""
        self._on_kill.append(callback)

    def wait_killed(self, timeout: float | None = None) -> bool:
        """Block until the container is killed; for programs that hang."""
        return self._kill_requested.wait(timeout)

    def end(self, info: ExitInfo) -> None:
        """End the container with ``info``, unless it has already ended."""
        with self._lock:
            if self._ended.is_set():
                return
            self._exit = info
            self._ended.set()
        self._wake_followers()

    def lose(self, error: BaseException) -> None:
        """The engine loses the container: ``wait`` raises ``error``."""
        with self._lock:
            if self._ended.is_set():
                return
            self._lost = error
            self._ended.set()
        self._wake_followers()

    def write(self, stream: str, data: bytes | str) -> None:
        """Write ``data`` to the container's ``stream`` (``stdout`` or ``stderr``), as its process would."""
        if stream not in OUTPUT_STREAMS:
            raise ValueError(f"stream must be one of {OUTPUT_STREAMS}, got {stream!r}")
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if not raw:
            return
        if stream == "stderr":
            self.stderr = (self.stderr + raw.decode("utf-8", "replace"))[-MAX_STDERR_CHARS:]
        with self._output_changed:
            room = MAX_OUTPUT_BYTES - self._output_bytes
            if len(raw) > room:
                self.output_dropped += len(raw) - max(room, 0)
                raw = raw[: max(room, 0)]
            if raw:
                self._output.append((stream, raw))
                self._output_bytes += len(raw)
            self._output_changed.notify_all()

    def follow(self) -> Iterator[tuple[str, bytes]]:
        """Everything written, then what is written, until the container ends or is removed."""
        if not self.started.is_set():
            return  # like an engine's follow of a container that never ran
        seen = 0
        while True:
            with self._output_changed:
                while seen == len(self._output) and not (self._ended.is_set() or self.removed):
                    self._output_changed.wait()
                fresh = self._output[seen:]
                seen += len(fresh)
                done = self._ended.is_set() or self.removed
            yield from fresh
            if done and not fresh:
                return

    def _wake_followers(self) -> None:
        with self._output_changed:
            self._output_changed.notify_all()

    def kill(self) -> None:
        """SIGKILL it: a running container ends with status 137."""
        with self._lock:
            running = self.started.is_set() and not self._ended.is_set()
            if running:
                self.killed = True
            self._kill_requested.set()
        for callback in self._on_kill:
            with contextlib.suppress(Exception):
                callback()
        if running:
            self.end(ExitInfo(SIGKILL_EXIT))

    def wait(self) -> ExitInfo:
        """Block until it ends, as the engine's ``wait`` does."""
        self._ended.wait()
        if self._lost is not None:
            raise self._lost
        assert self._exit is not None
        return self._exit

    def run(self, program: Program) -> None:
        """Start ``program`` in a thread; its return value ends the container."""

        def body() -> None:
            try:
                info = program(self)
            except BaseException as exc:  # a broken program is a crash, like a sandbox's
                self.write("stderr", f"fake program failed: {exc!r}\n")
                info = ExitInfo(1)
            self.end(info if info is not None else ExitInfo(0))

        self.started.set()
        threading.Thread(target=body, name=f"fake-{self.id}", daemon=True).start()


@dataclass
class FakeBackend:
    """A scripted container engine.

    Args:
        program: What every container runs (see the module docstring); by
            default it hangs until killed.
        create_errors: One entry per ``create`` call: an exception to raise,
            or ``None`` for a call that succeeds. Calls past the list succeed.
        start_errors: The same for ``start``.
        images: The images that exist; ``None`` for every image. A mapping
            gives each image's labels; listed by name, an image carries
            :data:`BUILT_HERE` (this wire version).
        managed: Containers ``list_managed`` reports besides the fake's own
            (e.g. orphans for the reaper).
        measures: What ``usage_supported`` says (a container's usage figures
            are whatever its program sets on it, ``None`` by default).
        info: What ``engine_info`` says.
    """

    program: Program | None = None
    create_errors: list[BaseException | None] = field(default_factory=list)
    start_errors: list[BaseException | None] = field(default_factory=list)
    images: Iterable[str] | Mapping[str, Mapping[str, str]] | None = None
    managed: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    measures: bool = True
    info: EngineInfo = FAKE_ENGINE
    calls: list[tuple[str, str]] = field(default_factory=list)
    containers: dict[str, FakeContainer] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()

    def _record(self, op: str, subject: str) -> None:
        with self._lock:
            self.calls.append((op, subject))

    def ops(self, container_id: str) -> list[str]:
        """The operations made on ``container_id``, in order."""
        with self._lock:
            return [op for op, subject in self.calls if subject == container_id]

    def only(self) -> FakeContainer:
        """The one container made so far (fails if there is not exactly one)."""
        (container,) = self.containers.values()
        return container

    def all_removed(self) -> bool:
        """Whether every container created was removed."""
        return all(c.removed for c in self.containers.values())

    # -- ContainerBackend ------------------------------------------------
    def engine_info(self) -> EngineInfo:
        """:attr:`info`."""
        return self.info

    def check_image(self, image: str) -> None:
        """Raise ``ImageNotFoundError`` unless ``image`` is one of :attr:`images`, of this wire version."""
        self._record("check_image", image)
        if self.images is None:
            labels: Mapping[str, str] = BUILT_HERE
        elif isinstance(self.images, Mapping):
            if image not in self.images:
                raise ImageNotFoundError(f"sandbox image {image} is not built; {IMAGE_FIX}")
            labels = self.images[image]
        else:
            if image not in set(self.images):
                raise ImageNotFoundError(f"sandbox image {image} is not built; {IMAGE_FIX}")
            labels = BUILT_HERE
        check_image_labels(image, labels)

    def check_runtime(self, policy: IsolationPolicy) -> None:
        """Accept every policy: the fake enforces nothing (it proves supervision logic only)."""

    def create(self, spec: ContainerSpec) -> str:
        """A new container, or the scripted error of this call."""
        self._record("create", spec.name)
        if self.create_errors:
            error = self.create_errors.pop(0)
            if error is not None:
                raise error
        container_id = f"fake-{next(self._ids)}"
        self.containers[container_id] = FakeContainer(container_id, spec)
        return container_id

    def start(self, container_id: str) -> None:
        """Start the container's program, or raise the scripted error of this call."""
        self._record("start", container_id)
        if self.start_errors:
            error = self.start_errors.pop(0)
            if error is not None:
                raise error
        self._get(container_id).run(self.program or hangs())

    def wait(self, container_id: str) -> ExitInfo:
        """Block until the container ends; raise if the engine lost it."""
        self._record("wait", container_id)
        return self._get(container_id).wait()

    def kill(self, container_id: str) -> None:
        """Kill it; no error if it already stopped."""
        self._record("kill", container_id)
        self._get(container_id).kill()

    def stderr_tail(self, container_id: str, lines: int) -> str:
        """The last ``lines`` lines the program left in ``stderr``."""
        text = self._get(container_id).stderr
        return "".join(text.splitlines(keepends=True)[-lines:])

    def follow_output(self, container_id: str) -> Iterator[tuple[str, bytes]]:
        """What the container's program writes (:meth:`FakeContainer.write`), until it ends or is removed."""
        self._record("follow_output", container_id)
        try:
            container = self._get(container_id)
        except ContainerError:
            return iter(())
        return container.follow()

    def remove(self, container_id: str) -> None:
        """Force-remove it (a running container is killed first)."""
        self._record("remove", container_id)
        container = self._get(container_id)
        container.kill()
        container.removed = True
        container._wake_followers()

    def usage_supported(self) -> bool:
        """Whether containers report usage: :attr:`measures` (tests say)."""
        return self.measures

    def usage(self, container_id: str) -> Usage | None:
        """What the running container's program set as its usage; ``None`` once it ended."""
        try:
            container = self._get(container_id)
        except ContainerError:
            return None
        if not container.running:
            return None
        cpu = container.cpu_s() if callable(container.cpu_s) else container.cpu_s
        container.usage_reads += 1
        return Usage(cpu_s=cpu, oom_kills=container.oom_kills, pids_refused=container.pids_refused)

    def scheduling(self, container_id: str) -> Scheduling | None:
        """What the running container's program set as its threads' standing; ``None`` once it ended."""
        try:
            container = self._get(container_id)
        except ContainerError:
            return None
        if not container.running:
            return None
        got = container.scheduling
        return got() if callable(got) else got

    def list_managed(self) -> list[tuple[str, dict[str, str]]]:
        """The fake's containers not yet removed, plus :attr:`managed`."""
        own = [
            (c.id, dict(c.spec.labels))
            for c in self.containers.values()
            if not c.removed and c.spec.labels.get(LABEL_MANAGED) == "true"
        ]
        return own + list(self.managed)

    def _get(self, container_id: str) -> FakeContainer:
        try:
            return self.containers[container_id]
        except KeyError:
            raise ContainerError(f"no such container: {container_id}", container_id=container_id) from None


# -- scripted programs ------------------------------------------------------


def exits(code: int = 0, stderr: str = "", stdout: str = "") -> Program:
    """The container exits by itself with ``code`` at once, having written ``stdout`` and ``stderr``."""

    def program(container: FakeContainer) -> ExitInfo:
        container.write("stdout", stdout)
        container.write("stderr", stderr)
        return ExitInfo(code)

    return program


def prints(*chunks: tuple[str, bytes | str], then: Program | None = None) -> Program:
    """The container writes ``(stream, data)`` chunks in order, then ends as ``then`` (exit 0 by default)."""

    def program(container: FakeContainer) -> ExitInfo | None:
        for stream, data in chunks:
            container.write(stream, data)
        return (then or exits(0))(container)

    return program


def out_of_memory(stderr: str = "") -> Program:
    """The kernel's OOM killer ends the container."""

    def program(container: FakeContainer) -> ExitInfo:
        container.write("stderr", stderr)
        return ExitInfo(SIGKILL_EXIT, oom_killed=True)

    return program


def killed_from_outside(stderr: str = "") -> Program:
    """Someone other than the executor SIGKILLs the container (e.g. ``docker kill``)."""

    def program(container: FakeContainer) -> ExitInfo:
        container.write("stderr", stderr)
        return ExitInfo(SIGKILL_EXIT)

    return program


def hangs() -> Program:
    """The container never exits by itself."""

    def program(container: FakeContainer) -> None:
        container.wait_killed()

    return program


def lost(message: str = "no such container") -> Program:
    """The engine loses the container: ``wait`` raises a ``ContainerError``."""

    def program(container: FakeContainer) -> None:
        container.lose(ContainerError(f"container wait failed: {message}", container_id=container.id))

    return program


def then(first: Callable[[FakeContainer], object], after: Program) -> Program:
    """Run ``first`` (e.g. a scripted sandbox talking to the session), then end as ``after``."""

    def program(container: FakeContainer) -> ExitInfo | None:
        first(container)
        return after(container)

    return program


# The test kit's engine is opened by name like any other (the backends room may not import this one).
register_backend("fake", FakeBackend)
