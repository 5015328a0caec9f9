"""scripts/install-runsc.sh against a stand-in engine: it registers runsc with --oci-seccomp, and upgrades.

The script runs for real (bash, python3) with ``docker``, ``pidof``, ``id`` and
``runsc`` replaced on ``PATH``: the fake ``docker info`` reports the runtimes of
the daemon.json the script edits (``DOCKER_DAEMON_JSON``), as dockerd does
after its SIGHUP, which goes to a ``sleep`` standing in for dockerd. The real
engine's registration is never touched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from collections.abc import Iterator

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install-runsc.sh"
REQUIRED = ["--network=none", "--host-uds=open", "--oci-seccomp"]

FAKE_DOCKER = f"""#!{sys.executable}
import json, os, sys
if sys.argv[1:3] != ["info", "--format"]:
    sys.exit("fake docker: unexpected " + " ".join(sys.argv[1:]))
with open(os.environ["DOCKER_DAEMON_JSON"]) as f:
    runtimes = {{"runc": {{"path": "runc"}}, **json.load(f).get("runtimes", {{}})}}
print(json.dumps(runtimes))
"""


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[dict[str, object]]:
    """A stand-in engine: fake commands on PATH, a daemon.json, a process to SIGHUP."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    dockerd = subprocess.Popen(["sleep", "60"])
    scripts = {
        "docker": FAKE_DOCKER,
        "pidof": f"#!/bin/sh\necho {dockerd.pid}\n",
        "id": '#!/bin/sh\necho "${FAKE_UID:-0}"\n',
        "runsc": "#!/bin/sh\nexit 0\n",
        "apt-get": "#!/bin/sh\necho 'fake apt-get must not run' >&2; exit 1\n",
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    daemon_json = tmp_path / "daemon.json"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "DOCKER_DAEMON_JSON": str(daemon_json)}
    yield {"env": env, "daemon_json": daemon_json, "runsc": str(bin_dir / "runsc")}
    dockerd.kill()
    dockerd.wait()


def _install(engine: dict[str, object], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT)],
        env={**engine["env"], **env},  # type: ignore[dict-item]
        capture_output=True,
        text=True,
        timeout=60,
    )


def _write(path: object, config: dict[str, object]) -> None:
    Path(str(path)).write_text(json.dumps(config))


def _read(path: object) -> dict[str, object]:
    return dict(json.loads(Path(str(path)).read_text()))


def test_a_registration_without_oci_seccomp_is_upgraded_keeping_everything_else(engine):
    _write(
        engine["daemon_json"],
        {
            "storage-driver": "overlay2",
            "runtimes": {
                "runsc": {
                    "path": "/usr/bin/runsc",
                    "runtimeArgs": ["--network=none", "--host-uds=open", "--platform=kvm"],
                },
                "other": {"path": "/x"},
            },
        },
    )
    proc = _install(engine)
    assert proc.returncode == 0, proc.stderr
    assert "--oci-seccomp on" in proc.stdout
    config = _read(engine["daemon_json"])
    assert config["storage-driver"] == "overlay2"
    assert config["runtimes"]["other"] == {"path": "/x"}  # type: ignore[index]
    assert config["runtimes"]["runsc"] == {  # type: ignore[index]
        "path": engine["runsc"],
        "runtimeArgs": ["--network=none", "--host-uds=open", "--platform=kvm", "--oci-seccomp"],
    }


def test_an_oci_seccomp_turned_off_is_turned_on(engine):
    args = ["--network=none", "--host-uds=open", "--oci-seccomp=false"]
    _write(engine["daemon_json"], {"runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": args}}})
    assert _install(engine).returncode == 0
    assert _read(engine["daemon_json"])["runtimes"]["runsc"]["runtimeArgs"] == REQUIRED  # type: ignore[index]


def test_no_registration_gets_one(engine):
    _write(engine["daemon_json"], {})
    assert _install(engine).returncode == 0
    assert _read(engine["daemon_json"])["runtimes"] == {  # type: ignore[comparison-overlap]
        "runsc": {"path": engine["runsc"], "runtimeArgs": REQUIRED}
    }


def test_a_complete_registration_is_left_alone(engine):
    _write(
        engine["daemon_json"], {"runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": REQUIRED}}}
    )
    before = Path(str(engine["daemon_json"])).read_text()
    proc = _install(engine, FAKE_UID="1000")  # not root: fine, as there is nothing to do
    assert proc.returncode == 0, proc.stderr
    assert "registered with the engine (--oci-seccomp on)" in proc.stdout
    assert Path(str(engine["daemon_json"])).read_text() == before


def test_without_root_an_upgrade_is_one_line_with_the_fix(engine):
    _write(
        engine["daemon_json"],
        {"runtimes": {"runsc": {"path": "/usr/bin/runsc", "runtimeArgs": REQUIRED[:2]}}},
    )
    proc = _install(engine, FAKE_UID="1000")
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1
    assert "sudo make runsc" in proc.stderr
