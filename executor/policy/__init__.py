"""Isolation policies: how tightly one project's sandboxes are confined.

A policy is a frozen, validated value. It says nothing about Docker: it asks for
an :class:`Isolation`, and each backend maps that to a runtime of its engine and
turns the rest into engine arguments. The defaults are the hardened
settings of the design; no field can loosen what every sandbox gets regardless
(no network, no capabilities, no new privileges, read-only root).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field, fields
from typing import Any

from executor.errors import PolicyError
from executor.policy import seccomp

DEFAULT_IMAGE = "sandbox-executor/sandbox:latest"


class Isolation(enum.Enum):
    """What stands between the protocol and the host's kernel; each backend maps it to a runtime."""

    CONTAINER = "container"
    """Namespaces, cgroups and seccomp on the host's own kernel."""
    GVISOR = "gvisor"
    """gVisor's user-space kernel between the sandbox and the host's."""


# The policy key ``runtime`` names the isolation in the words operators know
# (README, policy files, the outcome's ``runtime``): these spellings are the
# user-facing contract, whatever each engine calls its runtimes.
RUNTIME_ISOLATION: dict[str, Isolation] = {"runc": Isolation.CONTAINER, "runsc": Isolation.GVISOR}
RUNTIMES = tuple(RUNTIME_ISOLATION)
# Each live task runs as a uid of its own from [uid_start, uid_start + uid_count):
# the kernel's per-user pools (inotify, POSIX message queues, pipe pages, epoll
# watches, pending signals) are then per task, not shared by every sandbox.
DEFAULT_UID_START = 10_001
DEFAULT_UID_COUNT = 4096
# The group every sandbox shares, so one grant opens a datasource to all tasks.
DEFAULT_GID = 10_001
MAX_ID = 2**31 - 2
# Warm containers one policy may keep (each holds a uid, a socket and its memory).
MAX_WARM_POOL = 16
MAX_PRELOAD = 64
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,99}(\.[A-Za-z_][A-Za-z0-9_]{0,99}){0,15}")

_IMAGE_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,200}(:[A-Za-z0-9._-]{1,128})?(@sha256:[0-9a-f]{64})?$")

_SECRET_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
MAX_SECCOMP_BYTES = 1024 * 1024


def _check_seccomp(profile: str, runtime: str) -> None:
    """Refuse a profile the engine would not apply as written under ``runtime``.

    See :mod:`executor.policy.seccomp`: the profile is intersected with the default.
    """
    if not isinstance(profile, str):
        raise PolicyError(f"seccomp_profile: expected a profile's JSON text, got {type(profile).__name__}")
    if not profile:
        return
    if len(profile) > MAX_SECCOMP_BYTES:
        raise PolicyError(f"seccomp_profile: expected at most {MAX_SECCOMP_BYTES} bytes of JSON")
    seccomp.profile_json(profile, runtime)


def _check_secrets(secrets: tuple[tuple[str, str], ...]) -> None:
    if not isinstance(secrets, tuple):
        raise PolicyError('secrets: expected a table of NAME = "env:VARIABLE" or "file:/path"')
    for item in secrets:
        if not (isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)):
            raise PolicyError('secrets: expected a table of NAME = "env:VARIABLE" or "file:/path"')
        name, source = item
        if not _SECRET_NAME_RE.fullmatch(name):
            raise PolicyError(f"secrets: {name!r} is not a valid secret name (letters, digits, _)")
        kind, _, ref = source.partition(":")
        if kind not in ("env", "file") or not ref or (kind == "file" and not ref.startswith("/")):
            raise PolicyError(
                f'secrets.{name}: expected "env:VARIABLE" or "file:/absolute/path", got {source!r}'
            )


def _check_preload(preload: tuple[str, ...]) -> None:
    if not isinstance(preload, tuple) or not all(isinstance(m, str) for m in preload):
        raise PolicyError('preload: expected a list of module names, e.g. ["numpy", "pandas"]')
    if len(preload) > MAX_PRELOAD:
        raise PolicyError(f"preload: expected at most {MAX_PRELOAD} modules, got {len(preload)}")
    for name in preload:
        if not _MODULE_RE.fullmatch(name):
            raise PolicyError(f"preload: {name!r} is not a module name (dotted Python identifiers)")
    if len(set(preload)) != len(preload):
        raise PolicyError("preload: a module is named twice")


# (minimum, maximum) for each numeric field; a policy may tighten, never exceed.
_RANGES: dict[str, tuple[float, float]] = {
    "memory_mb": (32, 262_144),
    "cpus": (0.05, 256),
    "pids": (16, 4096),
    "nofile": (64, 65_536),
    "tmpfs_mb": (1, 65_536),
    "timeout_s": (1, 7 * 24 * 3600),
    "cpu_time_s": (0, 7 * 24 * 3600),
    "file_size_mb": (0, 65_536),
    "heartbeat_interval_s": (0.05, 60),
    "heartbeat_timeout_s": (0.2, 3600),
    "stall_timeout_s": (0, 7 * 24 * 3600),
    "max_message_mb": (1, 4096),
    "max_task_mb": (1, 65_536),
    "max_result_mb": (0.001, 64),
    "max_rows": (1, 100_000_000),
    "max_rows_mb": (1, 65_536),
    "uid": (1, MAX_ID),
    "uid_start": (1, MAX_ID),
    "uid_count": (1, 65_536),
    "gid": (1, MAX_ID),
    "warm_pool": (0, MAX_WARM_POOL),
}
# Numeric fields where None means "not set".
_OPTIONAL = {"uid"}


@dataclass(frozen=True)
class IsolationPolicy:
    """The confinement one task's sandbox runs under.

    Attributes:
        runtime: The isolation wanted, in the policy file's words: ``runc``
            (hardened namespaces, :attr:`Isolation.CONTAINER`) or ``runsc``
            (gVisor, :attr:`Isolation.GVISOR`); see :attr:`isolation`.
        image: The sandbox image; it must carry the child runtime.
        memory_mb: Memory limit, swap included.
        cpus: CPU quota in cores.
        pids: Maximum number of processes and threads in the sandbox (its
            init and runtime included); a fork or thread past it fails with
            EAGAIN. Under runc the container's pids cgroup enforces it; under
            gVisor its own kernel does (RLIMIT_NPROC, counted per sandbox), and
            gVisor's host threads are bounded apart
            (:func:`executor.backends.docker.host_pids_cap`).
        nofile: Maximum open file descriptors.
        tmpfs_mb: Size of the writable, non-executable ``/tmp``.
        timeout_s: Wall-clock limit of the protocol's run, from its first line
            (per batch in a batched run). The sandbox's boot before it has a
            grace of its own (:data:`executor.task.supervisor.BOOT_GRACE_S`).
        cpu_time_s: CPU seconds the whole sandbox may use from the protocol's
            first line (every process it forks included, as the host's cgroup
            counts them); past it the sandbox is killed and the task ends
            TIMEOUT (``CpuTimeExceeded``). 0 (the default) sets no limit.
        file_size_mb: The largest file the sandbox may write (RLIMIT_FSIZE, for
            every process in it): a write past it fails with "File too large",
            and a task that ends on that error ends ERROR
            (``FileSizeExceeded``). 0 (the default) sets no limit beyond the
            size of ``/tmp``.
        heartbeat_interval_s: How often the sandbox beats.
        heartbeat_timeout_s: Silence after which the sandbox counts as hung.
        stall_timeout_s: Time with heartbeats but no progress (no progress event,
            mailbox operation or movement of the protocol's main thread) after
            which the sandbox counts as stuck; 0 turns the check off.
        max_message_mb: Largest single mailbox message the sandbox may send or receive.
        max_task_mb: Most mailbox traffic one task may move, both ways together.
        max_result_mb: Largest result (JSON) the protocol may return.
        max_rows: Most result rows one task may save, all its batches
            together (each batch, one sandbox, may save at most 100,000).
        max_rows_mb: Most MiB of result rows (their JSON) one task may save,
            all its batches together (each batch at most 32 MiB).
        uid_start: The first uid of the range sandboxes run as. Each live task
            gets a uid of its own from the range, exclusive across executors on
            the host, so that tasks do not share the kernel's per-user pools.
        uid_count: How many uids the range holds: the most tasks that can run
            at once under this policy.
        uid: Pins one uid instead of the range (a range of one): at most one
            task under this policy runs at a time. ``None`` (the default) uses
            the range.
        gid: The group every sandbox runs as: a datasource readable by this
            group is readable by every task.
        seccomp_profile: A stricter seccomp profile (JSON text, an allow-list:
            its defaultAction refuses); empty means the executor's default
            (:mod:`executor.policy.seccomp`). The sandbox may make a call only when
            both this profile and the default allow it.
        secrets: Secrets granted to this project's sandboxes, as
            ``(name, source)`` with source ``env:VARIABLE`` or ``file:/path``,
            resolved in the parent at task start. Nothing else is granted.
        gpus: GPUs passed through: 0 (the default) for none, -1 for all.
        warm_pool: How many sandboxes of this policy the executor keeps started,
            booted and waiting for a task (see :mod:`executor.task.warmpool`). Each
            serves one task and is then destroyed; 0 (the default) starts every
            task cold.
        preload: Modules (from the image) the sandbox runtime imports before it
            asks for its task, warm or cold: in a warm sandbox heavy libraries
            then cost nothing at submission.
    """

    runtime: str = "runc"
    image: str = DEFAULT_IMAGE
    memory_mb: int = 1024
    cpus: float = 1.0
    pids: int = 128
    nofile: int = 1024
    tmpfs_mb: int = 64
    timeout_s: float = 3600.0
    cpu_time_s: float = 0.0
    file_size_mb: float = 0.0
    heartbeat_interval_s: float = 1.0
    heartbeat_timeout_s: float = 30.0
    stall_timeout_s: float = 0.0
    max_message_mb: int = 512
    max_task_mb: int = 4096
    max_result_mb: float = 1.0
    max_rows: int = 500_000
    max_rows_mb: int = 64
    uid_start: int = DEFAULT_UID_START
    uid_count: int = DEFAULT_UID_COUNT
    uid: int | None = None
    gid: int = DEFAULT_GID
    seccomp_profile: str = field(default="", repr=False)
    secrets: tuple[tuple[str, str], ...] = ()
    gpus: int = 0
    warm_pool: int = 0
    preload: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise PolicyError(f"runtime: expected one of {', '.join(RUNTIMES)}, got {self.runtime!r}")
        if not isinstance(self.image, str) or not _IMAGE_RE.fullmatch(self.image):
            raise PolicyError(f"image: expected a Docker image reference, got {self.image!r}")
        for f in fields(self):
            if f.name not in _RANGES:
                continue
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            lo, hi = _RANGES[f.name]
            integral = f.type in ("int", int, "int | None")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                kind = "an integer" if integral else "a number"
                raise PolicyError(f"{f.name}: expected {kind}, got {value!r}")
            if integral and not isinstance(value, int):
                raise PolicyError(f"{f.name}: expected an integer, got {value!r}")
            if not lo <= value <= hi:
                raise PolicyError(f"{f.name}: expected a value from {lo:g} to {hi:g}, got {value!r}")
        if self.uid_start + self.uid_count - 1 > MAX_ID:
            raise PolicyError(
                f"uid_count: the range from uid_start {self.uid_start} may end at uid {MAX_ID}, "
                f"got {self.uid_count} uids"
            )
        _check_seccomp(self.seccomp_profile, self.runtime)
        _check_secrets(self.secrets)
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or not -1 <= self.gpus <= 64:
            raise PolicyError(f"gpus: expected 0 (none), a count up to 64, or -1 (all), got {self.gpus!r}")
        if self.gpus and self.isolation is Isolation.GVISOR:
            # gVisor passes GPUs through only with its nvproxy, which this
            # runsc set-up does not enable: the key would be silently ignored.
            raise PolicyError(
                "gpus: runtime runsc cannot pass GPUs through (gVisor's nvproxy is not enabled); "
                "use runtime runc for GPU projects, or gpus = 0"
            )
        _check_preload(self.preload)
        if self.warm_pool >= self.uid_count:
            raise PolicyError(
                f"warm_pool: expected fewer warm sandboxes than uid_count ({self.uid_count}), "
                f"got {self.warm_pool}: warm sandboxes and running tasks each hold a uid"
            )
        if self.heartbeat_timeout_s <= self.heartbeat_interval_s:
            raise PolicyError(
                "heartbeat_timeout_s: expected more than heartbeat_interval_s "
                f"({self.heartbeat_interval_s:g}), got {self.heartbeat_timeout_s:g}"
            )

    @classmethod
    def hardened(cls) -> IsolationPolicy:
        """The default policy: every hardening on, modest resource caps."""
        return cls()

    def replace(self, **changes: Any) -> IsolationPolicy:
        """A copy with ``changes`` applied and validated."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise PolicyError(f"unknown policy key(s): {', '.join(sorted(unknown))}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return IsolationPolicy(**values)

    def describe(self) -> dict[str, Any]:
        """The effective policy as plain data (secret sources, not values)."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["seccomp_profile"] = (
            "custom, within the executor's default" if self.seccomp_profile else "executor default"
        )
        out["secrets"] = {name: source for name, source in self.secrets}
        out["preload"] = list(self.preload)
        return out

    def check_warm_pool(self) -> None:
        """Refuse a warm pool that could never fill: a pinned uid leaves no uid for a second sandbox.

        Not part of validation: a task's or slot's own copy of the policy pins
        the uid it leased.

        Raises:
            PolicyError: ``warm_pool`` is set along with a pinned ``uid``.
        """
        if self.warm_pool and self.uid is not None:
            raise PolicyError(
                "warm_pool: each warm sandbox holds a uid of its own, so it needs the uid range; "
                f"unset uid (pinned to {self.uid}) or set warm_pool = 0"
            )

    @property
    def isolation(self) -> Isolation:
        """The isolation :attr:`runtime` asks for, which the backend maps to its engine's runtime."""
        return RUNTIME_ISOLATION[self.runtime]

    @property
    def uid_range(self) -> range:
        """The uids a task under this policy may run as: one if ``uid`` pins it."""
        if self.uid is not None:
            return range(self.uid, self.uid + 1)
        return range(self.uid_start, self.uid_start + self.uid_count)

    @property
    def max_message_bytes(self) -> int:
        """``max_message_mb`` in bytes."""
        return int(self.max_message_mb * 1024 * 1024)

    @property
    def max_task_bytes(self) -> int:
        """``max_task_mb`` in bytes."""
        return int(self.max_task_mb * 1024 * 1024)

    @property
    def file_size_bytes(self) -> int:
        """``file_size_mb`` in bytes (0: no limit)."""
        return int(self.file_size_mb * 1024 * 1024)

    @property
    def max_result_bytes(self) -> int:
        """``max_result_mb`` in bytes."""
        return int(self.max_result_mb * 1024 * 1024)

    @property
    def max_rows_bytes(self) -> int:
        """``max_rows_mb`` in bytes."""
        return self.max_rows_mb * 1024 * 1024
