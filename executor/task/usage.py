"""A sandbox's CPU time and OOM kills over time, read from its cgroup (never from the sandbox).

The supervisor and the warm pool judge a silent sandbox by it: one whose CPU
time advances is slow (a busy host, a long boot), one whose CPU time stood
still is frozen.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from executor.backends import ContainerBackend, Scheduling, Usage

log = logging.getLogger(__name__)

# A sandbox silent past its limit is frozen only if its CPU time stood still
# too, over the latter half of the limit: it used less than this share of
# one core (and less than FROZEN_CPU_MIN_S). Otherwise it is slow (a busy
# host, a boot that takes long) and keeps being watched. Measured here: a
# stopped or idle runc sandbox uses no CPU at all; gVisor's own kernel uses
# about 0.2 ms a second while the sandbox's processes are stopped; a sandbox
# booting among 24 others on 2 cores at load 20 got 2 to 6% of a core.
FROZEN_CPU_SHARE = 0.002
FROZEN_CPU_MIN_S = 0.002
# A silent sandbox whose CPU time stood still is looked at once more this
# long after (a share of its limit, within bounds) before it is judged frozen:
# if its threads were runnable but starved of CPU for at least
# STARVED_WAIT_SHARE of that time (summed over its threads), or any was
# running, runnable or in an uninterruptible wait (its storage starved too) at
# either look, it is slow. A stopped or deadlocked sandbox has no such thread
# and waits for no CPU; gVisor's own idle kernel wakes a few times a second.
CONFIRM_SHARE = 0.25
CONFIRM_MIN_S = 0.25
CONFIRM_MAX_S = 2.0
STARVED_WAIT_SHARE = 0.25
# How often the container's cgroup is read (its CPU time, OOM kills).
USAGE_SAMPLE_S = 0.25
# Samples kept per watched window at most: a long window is sampled more sparsely.
_MAX_SAMPLES = 240


class UsageWatch:
    """The container's CPU time over time, read from its cgroup (never from the sandbox)."""

    def __init__(self, backend: ContainerBackend, container_id: str, window_s: float) -> None:
        self._backend = backend
        self._cid = container_id
        # Several samples per window however short it is, and at most a few a second.
        self._every = max(0.02, min(USAGE_SAMPLE_S, window_s / 8))
        self._keep_s = window_s + 2 * self._every
        self._samples: deque[tuple[float, float]] = deque()
        self._sampled_at = -1e18
        self.last: Usage | None = None

    def sample(self, now: float, *, force: bool = False) -> Usage | None:
        """Read the cgroup if a sample is due (or ``force``); the latest usage known."""
        if not force and now - self._sampled_at < self._every:
            return self.last
        self._sampled_at = now
        try:
            usage = self._backend.usage(self._cid)
        except Exception:  # a backend's failure to measure is an unknown, never a verdict
            log.debug("container %s: reading its usage failed", self._cid[:12], exc_info=True)
            usage = None
        if usage is None:
            return self.last
        self.last = usage
        if usage.cpu_s is not None:
            self._samples.append((now, usage.cpu_s))
            # Keep one sample from before the window, so that it is covered whole.
            while len(self._samples) > 2 and now - self._samples[1][0] > self._keep_s:
                self._samples.popleft()
            if len(self._samples) > _MAX_SAMPLES:
                # A long window: keep every other of its older half (coarser, still covering it).
                half = len(self._samples) // 2
                older = list(self._samples)[:half:2]
                self._samples = deque(older + list(self._samples)[half:])
        return usage

    @property
    def cpu_s(self) -> float | None:
        """The CPU seconds used so far, as last read."""
        return self.last.cpu_s if self.last is not None else None

    def cpu_over(self, window_s: float, now: float) -> float | None:
        """CPU seconds used over the last ``window_s`` (or since watching began); ``None`` if unknown."""
        if len(self._samples) < 2:
            return None
        since = now - window_s
        base = self._samples[0][1]
        for t, cpu in self._samples:
            if t > since:
                break
            base = cpu
        return self._samples[-1][1] - base

    def oom_kills(self) -> int:
        """OOM kills in the container so far, as last read (its cgroup counts from its creation)."""
        if self.last is None or self.last.oom_kills is None:
            return 0
        return self.last.oom_kills

    def pids_refused(self) -> int:
        """Forks refused at the container's pids cap so far, as last read."""
        if self.last is None or self.last.pids_refused is None:
            return 0
        return self.last.pids_refused


def busy(cpu_s: float | None, window_s: float) -> bool:
    """Whether ``cpu_s`` of CPU over ``window_s`` means the sandbox still runs (slow, not frozen)."""
    return cpu_s is not None and cpu_s >= max(FROZEN_CPU_MIN_S, FROZEN_CPU_SHARE * window_s)


def confirm_s(limit_s: float) -> float:
    """How long after a silent, still sandbox is first suspected it is looked at again."""
    return min(CONFIRM_MAX_S, max(CONFIRM_MIN_S, CONFIRM_SHARE * limit_s))


def moving(first: Scheduling | None, later: Scheduling | None, elapsed_s: float) -> bool:
    """Whether two looks at a silent sandbox's threads, ``elapsed_s`` apart, show it wanting the host.

    Unknown (either look ``None``) is not moving: the verdict then rests on
    CPU time alone, as on a host that cannot tell.
    """
    if first is None or later is None:
        return False
    if first.active or later.active:
        return True
    return later.waited_s - first.waited_s >= STARVED_WAIT_SHARE * elapsed_s
