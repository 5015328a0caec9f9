"""``doctor`` asks through the backend seam: the engine's facts, its runtimes, the images as a task would."""

from __future__ import annotations

import pytest

from executor.backends import LABEL_WIRE, EngineInfo, RuntimeInfo, backend_names
from executor.backends.docker import DockerBackend
from executor.cli import doctor
from executor.errors import EngineUnavailableError
from executor.policy import DEFAULT_IMAGE, Isolation
from executor.sandbox.contract import WIRE_VERSION
from executor.testing import FakeBackend

NUMPY = "sandbox-executor/numpy:latest"
RUNC = RuntimeInfo("runc", Isolation.CONTAINER)


def _by_name(backend: FakeBackend, data_dir=None) -> dict[str, doctor.Check]:
    return {c.name: c for c in doctor.checks(data_dir, backend=backend)}


@pytest.fixture
def no_raw_client(monkeypatch):
    def refuse(self: DockerBackend) -> None:
        raise AssertionError("doctor reached for the raw docker-py client")

    monkeypatch.setattr(DockerBackend, "client", property(refuse))


def test_doctor_opens_the_default_backend_by_name(monkeypatch, no_raw_client):
    # No engine here: the Docker backend is what doctor opened, and its error is one line with the fix.
    def unreachable(self: DockerBackend) -> EngineInfo:
        raise EngineUnavailableError("the Docker engine is not reachable (connection refused)")

    monkeypatch.setattr(DockerBackend, "engine_info", unreachable)
    [check] = doctor.checks()
    assert (check.name, check.ok) == ("engine", False)
    assert "not reachable" in check.detail
    assert "dockerd" in check.fix
    assert "docker" in backend_names()


def test_an_unreachable_engine_is_one_missing_line_with_the_fix():
    class Unreachable(FakeBackend):
        def engine_info(self) -> EngineInfo:
            raise EngineUnavailableError("the Docker engine is not reachable (connection refused)")

    [check] = doctor.checks(backend=Unreachable())
    assert (check.name, check.ok) == ("engine", False)
    assert "not reachable" in check.detail
    assert "dockerd" in check.fix


def test_a_reachable_engine_reports_its_facts_runtimes_and_images():
    backend = FakeBackend(images=[DEFAULT_IMAGE], info=EngineInfo("Docker", "27.1", "2", (RUNC,)))
    by_name = _by_name(backend)
    assert by_name["engine"].detail == "Docker 27.1, cgroup v2"
    assert by_name["runtime runc"].ok
    assert not by_name["runtime runsc"].ok
    assert by_name[f"image {DEFAULT_IMAGE}"].ok
    assert by_name[f"image {DEFAULT_IMAGE}"].required
    assert not by_name[f"image {NUMPY}"].ok
    assert not by_name[f"image {NUMPY}"].required
    assert "make images" in by_name[f"image {NUMPY}"].detail


def test_an_image_of_another_wire_version_is_missing_with_the_fix_and_asked_once():
    stale = {DEFAULT_IMAGE: {LABEL_WIRE: str(WIRE_VERSION - 1)}, NUMPY: {}}
    backend = FakeBackend(images=stale)
    by_name = _by_name(backend)
    sandbox, numpy = by_name[f"image {DEFAULT_IMAGE}"], by_name[f"image {NUMPY}"]
    assert not sandbox.ok
    assert sandbox.required
    assert f"wire version {WIRE_VERSION - 1}" in sandbox.detail
    assert "make images" in sandbox.detail
    assert not numpy.ok
    assert "no wire version" in numpy.detail
    assert "\n" not in sandbox.detail + numpy.detail
    assert [s for op, s in backend.calls if op == "check_image"] == [DEFAULT_IMAGE, NUMPY]


def test_doctor_says_how_a_given_datasource_would_be_viewed(monkeypatch, tmp_path):
    monkeypatch.setenv("SANDBOX_EXECUTOR_RUN_DIR", str(tmp_path / "run"))
    data = tmp_path / "data"
    data.mkdir()
    backend = FakeBackend(info=EngineInfo("Docker", "27.1", "2", (RUNC,)))
    assert _by_name(backend, data)["data views"].detail.startswith("hard links")  # one filesystem here
    assert _by_name(backend)["data views"].detail.startswith("hard links where the data shares a filesystem")


def test_doctor_tells_whether_gvisor_applies_seccomp_profiles():
    found = {}
    for applies in (True, False):
        runsc = RuntimeInfo("runsc", Isolation.GVISOR, applies_seccomp=applies)
        found[applies] = _by_name(FakeBackend(info=EngineInfo("Docker", "20.10", "2", (RUNC, runsc))))[
            "runsc seccomp"
        ]
    assert found[True].ok
    assert not found[False].ok
    assert not found[False].required
    assert "--oci-seccomp" in found[False].detail
    assert "sudo make runsc" in found[False].fix
    # No gVisor at all: nothing to say about its seccomp.
    assert "runsc seccomp" not in _by_name(FakeBackend(info=EngineInfo("Docker", "20.10", "2", (RUNC,))))
