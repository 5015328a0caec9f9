"""One contract for every registered backend: the cases the unit (fake) and integration (all) suites run.

Every scenario runs through the :class:`~executor.backends.ContainerBackend`
interface: a scripted backend (the test kit's fake) is handed the scenario's
program, a real engine runs its command in a container from the sandbox
image. A difference between the two is a supervisor unit test that proves
nothing, so it fails here. A suite subclasses :class:`BackendContract` and
gives it an ``engine`` fixture made by :func:`open_engine`, parametrised over
the backends it can run.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pytest

from executor import testing
from executor.backends import (
    LABEL_MANAGED,
    LABEL_PARENT,
    ContainerBackend,
    ContainerSpec,
    ExitInfo,
    open_backend,
)
from executor.errors import ImageNotFoundError
from executor.policy import DEFAULT_IMAGE, Isolation, IsolationPolicy
from executor.task.reaper import new_instance_id

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

# The backends that need no engine: the unit suite runs the contract over them.
ENGINE_FREE = frozenset({"fake"})
# How the contract opens a backend, where its defaults would not do (the fake has every image).
OPTIONS: dict[str, dict[str, Any]] = {"fake": {"images": [DEFAULT_IMAGE]}}
# A uid no leased task uses (outside the default range), for containers made
# here without an executor.
CONTRACT_UID = 9_999
MISSING_IMAGE = "sandbox-executor/never-built:latest"


@dataclass(frozen=True)
class Scenario:
    """What a container does, as a command for a real engine and a program for a scripted one."""

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

    name: str
    backend: ContainerBackend
    make: Callable[[str], str]


def open_engine(name: str) -> Iterator[Engine]:
    """The backend registered as ``name``, opened for the contract; its containers are removed after."""
    made: list[str] = []
    owner = new_instance_id()  # this live process: no reaper takes them meanwhile
    backend = open_backend(name, **OPTIONS.get(name, {}))

    def make(scenario_name: str) -> str:
        scenario = SCENARIOS[scenario_name]
        if isinstance(backend, testing.FakeBackend):
            backend.program = scenario.program
        policy = IsolationPolicy.hardened().replace(
            uid=CONTRACT_UID, memory_mb=scenario.memory_mb, timeout_s=60
        )
        spec = ContainerSpec(
            name=f"contract-{scenario_name}-{uuid.uuid4().hex[:8]}",
            command=scenario.command,
            policy=policy,
            mounts=[],
            labels={LABEL_MANAGED: "true", LABEL_PARENT: owner},
        )
        container_id = backend.create(spec)
        made.append(container_id)
        return container_id

    yield Engine(name, backend, make)
    for container_id in made:
        backend.remove(container_id)


class BackendContract:
    """The cases every backend passes; a suite subclasses it with its own ``engine`` fixture."""

    def test_the_engine_names_itself_and_gives_plain_containers(self, engine: Engine) -> None:
        info = engine.backend.engine_info()
        assert info.name
        assert info.version
        plain = info.runtime_for(Isolation.CONTAINER)
        assert plain is not None
        assert plain.name
        assert plain.applies_seccomp  # the default profile always holds in a plain container

    def test_a_missing_image_is_reported_as_such(self, engine: Engine) -> None:
        engine.backend.check_image(DEFAULT_IMAGE)  # built by this checkout: of this wire version
        with pytest.raises(ImageNotFoundError, match="make images"):
            engine.backend.check_image(MISSING_IMAGE)

    def test_an_exit_is_reported_with_its_code_and_stderr(self, engine: Engine) -> None:
        cid = engine.make("exits")
        engine.backend.start(cid)
        assert engine.backend.wait(cid) == ExitInfo(3, oom_killed=False)
        assert engine.backend.stderr_tail(cid, 2) == "two\nabout to vanish\n"
        engine.backend.kill(cid)  # already stopped: no error

    def test_a_killed_container_reports_sigkill_not_oom(self, engine: Engine) -> None:
        cid = engine.make("hangs")
        engine.backend.start(cid)
        engine.backend.kill(cid)
        assert engine.backend.wait(cid) == ExitInfo(137, oom_killed=False)
        engine.backend.kill(cid)  # twice: no error

    def test_an_out_of_memory_kill_is_flagged(self, engine: Engine) -> None:
        cid = engine.make("out_of_memory")
        engine.backend.start(cid)
        info = engine.backend.wait(cid)
        assert info.oom_killed
        assert info.exit_code == 137

    def test_managed_containers_are_listed_until_removed(self, engine: Engine) -> None:
        cid = engine.make("hangs")
        listed = dict(engine.backend.list_managed())
        assert cid in listed
        assert listed[cid][LABEL_MANAGED] == "true"
        engine.backend.remove(cid)  # created, never started
        assert cid not in dict(engine.backend.list_managed())
        engine.backend.remove(cid)  # twice: no error

    def test_a_running_container_is_removed_by_force(self, engine: Engine) -> None:
        cid = engine.make("hangs")
        engine.backend.start(cid)
        engine.backend.remove(cid)
        assert cid not in dict(engine.backend.list_managed())
