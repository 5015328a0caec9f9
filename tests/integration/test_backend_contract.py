"""One contract, two engines: the fake that unit tests trust behaves as the real Docker backend.

Every scenario runs through the :class:`~executor.backends.ContainerBackend`
interface against both :class:`~executor.testing.FakeBackend` (scripted) and
:class:`~executor.backends.docker.DockerBackend` (a real container from the
sandbox image doing the same thing). A difference between the two is a
supervisor unit test that proves nothing, so it fails here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from executor import testing
from executor.backends import LABEL_MANAGED, LABEL_PARENT, ContainerBackend, ContainerSpec, ExitInfo
from executor.errors import ImageNotFoundError
from executor.policy import DEFAULT_IMAGE, IsolationPolicy
from executor.task.reaper import new_instance_id

pytestmark = pytest.mark.integration

# A uid no leased task uses (outside the default range), for containers made
# here without an executor.
CONTRACT_UID = 9_999
MISSING_IMAGE = "sandbox-executor/never-built:latest"


@dataclass(frozen=True)
class Scenario:
    """What a container does, as a command for Docker and a program for the fake."""

    command: list[str]
    program: testing.Program
    memory_mb: int = 256


SCENARIOS = {
    "exits": Scenario(
        ["python3", "-c", "import sys; sys.stderr.write('one\\ntwo\\nabout to vanish\\n'); sys.exit(3)"],
        testing.exits(3, stderr="one\ntwo\nabout to vanish\n"),
    ),
    "hangs": Scenario(["python3", "-c", "import time; time.sleep(600)"], testing.hangs()),
    "out_of_memory": Scenario(
        ["python3", "-c", "b = bytearray(512 * 1024 * 1024)"], testing.out_of_memory(), memory_mb=64
    ),
}


@dataclass
class Engine:
    """A backend under test, and how to make a container for a scenario on it."""

    backend: ContainerBackend
    make: Callable[[str], str]


@pytest.fixture(params=["fake", "docker"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    made: list[str] = []
    owner = new_instance_id()  # this live process: no reaper takes them meanwhile
    if request.param == "docker":
        request.getfixturevalue("docker_client")
        from executor.backends.docker import DockerBackend

        backend: ContainerBackend = DockerBackend()
        fake = None
    else:
        fake = testing.FakeBackend(images=[DEFAULT_IMAGE])
        backend = fake

    def make(name: str) -> str:
        scenario = SCENARIOS[name]
        if fake is not None:
            fake.program = scenario.program
        policy = IsolationPolicy.hardened().replace(
            uid=CONTRACT_UID, memory_mb=scenario.memory_mb, timeout_s=60
        )
        spec = ContainerSpec(
            name=f"contract-{name}-{uuid.uuid4().hex[:8]}",
            command=scenario.command,
            policy=policy,
            mounts=[],
            labels={LABEL_MANAGED: "true", LABEL_PARENT: owner},
        )
        container_id = backend.create(spec)
        made.append(container_id)
        return container_id

    yield Engine(backend, make)
    for container_id in made:
        backend.remove(container_id)


def test_a_missing_image_is_reported_as_such(engine):
    engine.backend.check_image(DEFAULT_IMAGE)
    with pytest.raises(ImageNotFoundError):
        engine.backend.check_image(MISSING_IMAGE)


def test_an_exit_is_reported_with_its_code_and_stderr(engine):
    cid = engine.make("exits")
    engine.backend.start(cid)
    assert engine.backend.wait(cid) == ExitInfo(3, oom_killed=False)
    assert engine.backend.stderr_tail(cid, 2) == "two\nabout to vanish\n"
    engine.backend.kill(cid)  # already stopped: no error


def test_a_killed_container_reports_sigkill_not_oom(engine):
    cid = engine.make("hangs")
    engine.backend.start(cid)
    engine.backend.kill(cid)
    assert engine.backend.wait(cid) == ExitInfo(137, oom_killed=False)
    engine.backend.kill(cid)  # twice: no error


def test_an_out_of_memory_kill_is_flagged(engine):
    cid = engine.make("out_of_memory")
    engine.backend.start(cid)
    info = engine.backend.wait(cid)
    assert info.oom_killed
    assert info.exit_code == 137


def test_managed_containers_are_listed_until_removed(engine):
    cid = engine.make("hangs")
    listed = dict(engine.backend.list_managed())
    assert cid in listed
    assert listed[cid][LABEL_MANAGED] == "true"
    engine.backend.remove(cid)  # created, never started
    assert cid not in dict(engine.backend.list_managed())
    engine.backend.remove(cid)  # twice: no error


def test_a_running_container_is_removed_by_force(engine):
    cid = engine.make("hangs")
    engine.backend.start(cid)
    engine.backend.remove(cid)
    assert cid not in dict(engine.backend.list_managed())
