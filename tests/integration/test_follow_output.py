"""A real sandbox's stdout and stderr, followed from the engine while it runs, arrive tagged by stream."""

from __future__ import annotations

import threading
import uuid
from typing import TYPE_CHECKING

import pytest

from executor.backends import LABEL_MANAGED, LABEL_PARENT, ContainerSpec, Mount
from executor.backends.docker import DockerBackend
from executor.policy import IsolationPolicy
from executor.task.output import NOTE_STREAM, OutputCollector
from executor.task.reaper import new_instance_id
from tests.conftest import bounded

if TYPE_CHECKING:
    from collections.abc import Iterator

pytestmark = pytest.mark.integration

# A uid no leased task uses (outside the default range), for containers made
# here without an executor.
FOLLOW_UID = 9_998
# Through the sandbox's own init, as a task's runtime runs: its pipes, its caps.
INIT = ["python3", "-m", "executor.sandbox.init", "--"]
# Half the output, then a wait until the parent, which follows, has seen it
# (it drops a file into a read-only mount), then the other half.
PRINTER = """
import os, sys, time
for i in range(3):
    print(f"out {i}", flush=True)
    sys.stderr.write(f"err {i}\\n"); sys.stderr.flush()
deadline = time.monotonic() + 60
while not os.path.exists("/handshake/seen") and time.monotonic() < deadline:
    time.sleep(0.05)
for i in range(3, 6):
    print(f"out {i}", flush=True)
    sys.stderr.write(f"err {i}\\n"); sys.stderr.flush()
sys.stdout.write("no newline at the end")
"""


@pytest.fixture
def backend(docker_client: object) -> Iterator[tuple[DockerBackend, list[str]]]:
    """The Docker backend, and the ids of containers to remove afterwards whatever happened."""
    engine = DockerBackend()
    made: list[str] = []
    yield engine, made
    for container_id in made:
        engine.remove(container_id)


def _create(
    backend: DockerBackend, made: list[str], command: list[str], mounts: list[Mount] | None = None
) -> str:
    spec = ContainerSpec(
        name=f"follow-{uuid.uuid4().hex[:8]}",
        command=command,
        policy=bounded(IsolationPolicy.hardened().replace(uid=FOLLOW_UID, memory_mb=256)),
        mounts=mounts or [],
        labels={LABEL_MANAGED: "true", LABEL_PARENT: new_instance_id()},
    )
    container_id = backend.create(spec)
    made.append(container_id)
    return container_id


def test_a_sandbox_s_lines_arrive_tagged_while_it_runs(backend, tmp_path):
    engine, made = backend
    handshake = tmp_path / "handshake"
    handshake.mkdir()
    handshake.chmod(0o755)
    cid = _create(engine, made, [*INIT, "python3", "-c", PRINTER], [Mount(handshake, "/handshake")])
    lines: list[tuple[str, str]] = []
    first_half = threading.Event()

    def on_line(stream: str, text: str) -> None:
        lines.append((stream, text))
        if {("stdout", "out 2"), ("stderr", "err 2")} <= set(lines):
            first_half.set()

    collector = OutputCollector(engine, "follow-test", on_line=on_line)
    engine.start(cid)
    collector.start(cid)
    assert first_half.wait(60), f"the first half never arrived: {lines}"
    # The sandbox is still waiting for this: the lines came while it ran.
    assert engine.client.api.inspect_container(cid)["State"]["Running"]
    (handshake / "seen").touch()
    assert engine.wait(cid).exit_code == 0
    collector.stop(timeout_s=60)
    assert [t for s, t in lines if s == "stdout"] == [f"out {i}" for i in range(6)] + [
        "no newline at the end"
    ]
    assert [t for s, t in lines if s == "stderr"] == [f"err {i}" for i in range(6)]
    assert not [line for line in lines if line[0] == NOTE_STREAM]
    assert "err 5\n" in collector.tail()
    assert "out 5\n" in collector.tail()
    engine.remove(cid)
    assert cid not in dict(engine.list_managed())


def test_removing_a_running_sandbox_ends_its_follow(backend):
    engine, made = backend
    cid = _create(
        engine, made, [*INIT, "python3", "-c", "print('up', flush=True); import time; time.sleep(600)"]
    )
    engine.start(cid)
    got: list[tuple[str, bytes]] = []
    first = threading.Event()

    def follow() -> None:
        for item in engine.follow_output(cid):
            got.append(item)
            first.set()

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    assert first.wait(60), "the first line never arrived"
    engine.remove(cid)  # must not wait for the follow, and must end it
    follower.join(60)
    assert not follower.is_alive(), "the follow outlived its container"
    assert got == [("stdout", b"up\n")]
    assert cid not in dict(engine.list_managed())
