"""Engines are opened by name: the executor and doctor name no backend class."""

from __future__ import annotations

import pytest

from executor.backends import DEFAULT_BACKEND, backend_names, open_backend, register_backend, registry
from executor.backends import docker as docker_backend
from executor.errors import ConfigurationError
from executor.runner import Executor
from executor.testing import FakeBackend


def test_docker_is_the_default_and_the_fake_is_registered_by_the_test_kit():
    assert DEFAULT_BACKEND == "docker"
    assert {"docker", "fake"} <= set(backend_names())
    assert isinstance(open_backend("fake", images=["x"]), FakeBackend)
    # Opening does not connect: an engine is reached on first use.
    assert isinstance(open_backend("docker"), docker_backend.DockerBackend)


def test_an_unknown_backend_is_a_configuration_error_naming_the_known_ones():
    with pytest.raises(ConfigurationError, match=r"expected one of docker, .*got 'kubernetes'"):
        open_backend("kubernetes")


def test_a_name_is_registered_once(monkeypatch):
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    register_backend("fake", FakeBackend)  # the same factory again: no change
    with pytest.raises(ValueError, match="registered already"):
        register_backend("fake", lambda **options: FakeBackend())
    register_backend("other", FakeBackend)
    assert backend_names()[-1] == "other"
    assert isinstance(open_backend("other"), FakeBackend)


def test_the_executor_opens_the_default_backend_when_given_none(monkeypatch, tmp_path):
    engine = FakeBackend()
    monkeypatch.setattr(docker_backend, "DockerBackend", lambda: engine)
    with Executor(run_dir=tmp_path / "run", spool_dir=tmp_path / "spool", uid_dir=tmp_path / "uids") as ex:
        assert ex.backend is engine
