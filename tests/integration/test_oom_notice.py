"""The kernel's own OOM notice for a container, read by the parent: it survives the container's cgroup.

Under gVisor the kernel kills one of its stub processes and gVisor ends the
whole sandbox; its cgroup is gone within milliseconds, and the engine's own
OOM flag comes from a notice it can lose in that race. ``OomWatch`` counts
the kernel's signals on the memory cgroup (one per OOM event, one at its
removal), so an OOM kill is named whatever the engine says.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from executor.backends.cgroups import OomWatch, paths_of
from executor.policy import DEFAULT_IMAGE

pytestmark = pytest.mark.integration

# Both programs wait for SIGUSR1 (blocked, so none is lost) before they act: the
# watch must be on the cgroup before a hog can end the sandbox, and under gVisor
# an OOM kill removes the cgroup within milliseconds of the container's start.
GATE = (
    "import signal\n"
    "signal.signal(signal.SIGUSR1, lambda *_: None)\n"
    "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})\n"
    "print('ready', flush=True)\n"
    "signal.sigwait({signal.SIGUSR1})\n"
)
HOG = GATE + "x = []\nwhile True:\n    x.append(bytearray(8 << 20))\n    x[-1][::4096] = b'\\1' * 2048\n"
EXITS = GATE + "import time\ntime.sleep(0.5)\n"
READY_WAIT_S = 60.0


def _wait_ready(container: Any) -> None:
    end = time.monotonic() + READY_WAIT_S
    while b"ready" not in container.logs(stdout=True, stderr=False):
        assert time.monotonic() < end, f"the program did not start within {READY_WAIT_S:g} s"
        time.sleep(0.05)


@pytest.mark.skipif(os.geteuid() != 0, reason="cgroup.event_control is root's to write")
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
@pytest.mark.parametrize(("program", "oom"), [(HOG, True), (EXITS, False)], ids=["hog", "exits"])
def test_the_kernel_s_oom_notice_is_seen_after_the_cgroup_is_gone(
    docker_client: Any, runtime: str, program: str, oom: bool
) -> None:
    if runtime not in docker_client.info().get("Runtimes", {}):
        pytest.fail(f"the {runtime} runtime is not registered with the engine: run `make runsc`")
    container = docker_client.containers.create(
        DEFAULT_IMAGE,
        ["python3", "-c", program],
        runtime=runtime,
        network_mode="none",
        mem_limit="128m",
        memswap_limit="128m",
        labels={"io.sandbox-executor.test": "oom-notice"},
    )
    try:
        container.start()
        _wait_ready(container)
        pid = int(docker_client.api.inspect_container(container.id)["State"]["Pid"])
        watch = OomWatch.of(paths_of(pid))
        assert watch is not None, "no OOM watch on a cgroup v1 memory controller as root"
        try:
            container.kill(signal="SIGUSR1")
            docker_client.api.wait(container.id, timeout=60)
            assert watch.oom_killed(2.0) is oom
        finally:
            watch.close()
    finally:
        container.remove(force=True)
