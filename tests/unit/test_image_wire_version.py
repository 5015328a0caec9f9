"""An image carries its child runtime's wire version; the parent refuses another before it starts anything."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import docker.errors
import pytest

from executor.backends import LABEL_WIRE, check_image_labels
from executor.backends.docker import DockerBackend
from executor.errors import ImageNotFoundError
from executor.sandbox import contract
from executor.sandbox.contract import WIRE_VERSION
from executor.testing import FakeBackend

REPO = Path(__file__).resolve().parents[2]
IMAGE = "sandbox-executor/sandbox:latest"


@pytest.mark.parametrize(
    ("labels", "says"),
    [
        ({}, "carries no wire version"),
        ({LABEL_WIRE: str(WIRE_VERSION + 1)}, f"built for wire version {WIRE_VERSION + 1}"),
        ({LABEL_WIRE: "x\n" * 40}, "built for wire version 'x\\nx\\n"),
    ],
)
def test_an_image_of_another_or_no_wire_version_is_refused_in_one_line_with_the_fix(labels, says):
    with pytest.raises(ImageNotFoundError) as info:
        check_image_labels(IMAGE, labels)
    message = str(info.value)
    assert says in message
    assert IMAGE in message
    assert "make images" in message
    assert "\n" not in message
    assert len(message) < 300


def test_an_image_of_this_wire_version_passes():
    check_image_labels(IMAGE, {LABEL_WIRE: str(WIRE_VERSION), "other": "label"})


def test_make_images_labels_both_images_with_the_contract_s_wire_version():
    # The Makefile reads the number from contract.py with sed: the line must keep its shape.
    line = re.compile(r"^WIRE_VERSION = ([0-9]+)$", re.M)
    assert line.findall(Path(contract.__file__).read_text()) == [str(WIRE_VERSION)]
    makefile = (REPO / "Makefile").read_text()
    assert f"IMAGE_LABELS := --label {LABEL_WIRE}=$(WIRE_VERSION)" in makefile
    assert "executor/sandbox/contract.py" in makefile
    builds = makefile.split("\tdocker build")[1:]
    assert len(builds) == 2
    assert all("$(IMAGE_LABELS)" in b.split("\n")[0] for b in builds)


class _Images:
    def __init__(self, labels: dict[str, str] | None) -> None:
        self.labels = labels

    def get(self, image: str) -> object:
        if self.labels is None:
            raise docker.errors.ImageNotFound(f"no such image: {image}")
        return SimpleNamespace(labels=self.labels)


def _docker(labels: dict[str, str] | None) -> DockerBackend:
    return DockerBackend(SimpleNamespace(images=_Images(labels)))  # type: ignore[arg-type]


def test_docker_reads_the_label_off_the_engine_s_image():
    _docker({LABEL_WIRE: str(WIRE_VERSION)}).check_image(IMAGE)
    with pytest.raises(ImageNotFoundError, match=f"built for wire version {WIRE_VERSION - 1},"):
        _docker({LABEL_WIRE: str(WIRE_VERSION - 1)}).check_image(IMAGE)
    with pytest.raises(ImageNotFoundError, match="carries no wire version"):
        _docker({}).check_image(IMAGE)
    with pytest.raises(ImageNotFoundError, match="is not built; run `make images`"):
        _docker(None).check_image(IMAGE)


def test_the_fake_s_images_are_of_this_version_unless_a_test_says_otherwise():
    FakeBackend().check_image(IMAGE)
    FakeBackend(images=[IMAGE]).check_image(IMAGE)
    with pytest.raises(ImageNotFoundError, match="wire version 0"):
        FakeBackend(images={IMAGE: {LABEL_WIRE: "0"}}).check_image(IMAGE)
    with pytest.raises(ImageNotFoundError, match="is not built"):
        FakeBackend(images={}).check_image(IMAGE)
