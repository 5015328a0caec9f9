"""``doctor`` speaks to the engine only through the backend's wrapped calls: no docker-py error reaches it."""

from __future__ import annotations

import pytest

from executor.backends.docker import DockerBackend, EngineInfo
from executor.cli import doctor
from executor.errors import EngineUnavailableError, ImageNotFoundError


@pytest.fixture(autouse=True)
def no_raw_client(monkeypatch):
    def refuse(self: DockerBackend) -> None:
        raise AssertionError("doctor reached for the raw docker-py client")

    monkeypatch.setattr(DockerBackend, "client", property(refuse))


def test_an_unreachable_engine_is_one_missing_line_with_the_fix(monkeypatch):
    def unreachable(self: DockerBackend) -> EngineInfo:
        raise EngineUnavailableError("the Docker engine is not reachable (connection refused)")

    monkeypatch.setattr(DockerBackend, "engine_info", unreachable)
    [check] = doctor.checks()
    assert (check.name, check.ok) == ("engine", False)
    assert "not reachable" in check.detail and "dockerd" in check.fix


def test_a_reachable_engine_reports_its_facts_runtimes_and_images(monkeypatch):
    monkeypatch.setattr(DockerBackend, "engine_info", lambda self: EngineInfo("27.1", "2", ("runc",)))

    def check_image(self: DockerBackend, image: str) -> None:
        if "numpy" in image:
            raise ImageNotFoundError(f"sandbox image {image} is not built")

    monkeypatch.setattr(DockerBackend, "check_image", check_image)
    by_name = {c.name: c for c in doctor.checks()}
    assert by_name["engine"].detail == "Docker 27.1, cgroup v2"
    assert by_name["runtime runc"].ok and not by_name["runtime runsc"].ok
    assert not by_name["image sandbox-executor/numpy:latest"].ok
    assert not by_name["image sandbox-executor/numpy:latest"].required


def test_doctor_says_how_a_given_datasource_would_be_viewed(monkeypatch, tmp_path):
    monkeypatch.setattr(DockerBackend, "engine_info", lambda self: EngineInfo("27.1", "2", ("runc",)))
    monkeypatch.setattr(DockerBackend, "check_image", lambda self, image: None)
    monkeypatch.setenv("SANDBOX_EXECUTOR_RUN_DIR", str(tmp_path / "run"))
    data = tmp_path / "data"
    data.mkdir()
    by_name = {c.name: c for c in doctor.checks(data)}
    assert by_name["data views"].detail.startswith("hard links")  # one filesystem here
    by_name = {c.name: c for c in doctor.checks()}
    assert by_name["data views"].detail.startswith("hard links where the data shares a filesystem")


def test_doctor_tells_whether_gvisor_applies_seccomp_profiles(monkeypatch):
    monkeypatch.setattr(DockerBackend, "check_image", lambda self, image: None)
    registered = {
        "without": ("--network=none", "--host-uds=open"),
        "with": ("--network=none", "--host-uds=open", "--oci-seccomp"),
    }
    found = {}
    for name, args in registered.items():
        info = EngineInfo("20.10", "2", ("runc", "runsc"), (("runc", ()), ("runsc", args)))
        monkeypatch.setattr(DockerBackend, "engine_info", lambda self, info=info: info)
        found[name] = {c.name: c for c in doctor.checks()}["runsc seccomp"]
    assert found["with"].ok
    assert not found["without"].ok and not found["without"].required
    assert "--oci-seccomp" in found["without"].detail and "sudo make runsc" in found["without"].fix
    # No runsc at all: nothing to say about its seccomp.
    monkeypatch.setattr(DockerBackend, "engine_info", lambda self: EngineInfo("20.10", "2", ("runc",)))
    assert "runsc seccomp" not in {c.name for c in doctor.checks()}
