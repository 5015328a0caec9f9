"""Fixtures shared by the integration and security suites: real engine, real images."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from executor.backends import LABEL_PARENT
from executor.policy import DEFAULT_IMAGE, IsolationPolicy
from executor.policy.file import PolicySet
from executor.task.reaper import new_instance_id

if TYPE_CHECKING:
    from collections.abc import Iterator

REPO = Path(__file__).resolve().parents[1]
PROTOCOLS = Path(__file__).parent / "protocols"
# Every task a test starts ends within this wall-clock limit whatever its
# protocol does, so a hang fails fast as a TIMEOUT outcome that names the task
# instead of running into pytest's own limit.
TEST_TIMEOUT_S = 120.0


def bounded(policy: IsolationPolicy) -> IsolationPolicy:
    """``policy`` with its wall-clock limit at most :data:`TEST_TIMEOUT_S`."""
    if policy.timeout_s <= TEST_TIMEOUT_S:
        return policy
    return policy.replace(timeout_s=TEST_TIMEOUT_S)


def bounded_set(policies: PolicySet) -> PolicySet:
    """Every policy of ``policies`` bounded like :func:`bounded`."""
    return PolicySet(
        source=policies.source,
        default=bounded(policies.default),
        projects={name: bounded(p) for name, p in policies.projects.items()},
    )


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run the CLI (``python -m executor.cli``) from the repository root, capturing its text output."""
    return subprocess.run(
        [sys.executable, "-m", "executor.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=timeout,
        **kwargs,
    )


def reused_pid_owner() -> str:
    """An owner id naming this live process's pid but a start time it never had."""
    host, pid, started, nonce = new_instance_id().split(":")
    return f"{host}:{pid}:{int(started) + 1}:{nonce}"


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
    """A docker-py client; the suites that use it fail loudly without an engine or image."""
    import docker

    client = docker.from_env()
    try:
        client.ping()
    except Exception as exc:  # pragma: no cover - environment problem
        pytest.fail(f"the Docker engine is not reachable: {exc}")
    try:
        client.images.get(DEFAULT_IMAGE)
    except docker.errors.ImageNotFound:
        pytest.fail(f"{DEFAULT_IMAGE} is not built: run `make images` (make test does)")
    yield client
    client.close()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short, private base for task directories, removed after the test."""
    path = Path(tempfile.mkdtemp(prefix="se-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    """A policy file for CLI runs: defaults, with the test wall-clock bound."""
    path = tmp_path / "test-policy.toml"
    path.write_text(f"[default]\ntimeout_s = {TEST_TIMEOUT_S:g}\n")
    return path


@pytest.fixture
def cli_env(run_dir: Path, tmp_path: Path) -> dict[str, str]:
    """Environment for a CLI subprocess: private run, spool and state (database) directories."""
    import os

    return {
        **os.environ,
        "SANDBOX_EXECUTOR_RUN_DIR": str(run_dir),
        "SANDBOX_EXECUTOR_SPOOL_DIR": str(tmp_path / "spool"),
        "SANDBOX_EXECUTOR_STATE_DIR": str(tmp_path / "state"),
    }


@pytest.fixture
def two_files(tmp_path: Path) -> Path:
    """A datasource with the two files the ``promises`` protocol reports on."""
    data = tmp_path / "files"
    data.mkdir()
    for name in ("good.csv", "bad.csv"):
        (data / name).write_text("id,value\n1,2\n")
        (data / name).chmod(0o644)
    data.chmod(0o755)
    return data


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A small datasource the sandbox user can read."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "records.csv").write_text("id,value\n1,10\n2,32\n")
    data.chmod(0o755)
    (data / "records.csv").chmod(0o644)
    return data


@pytest.fixture
def modeller() -> Iterator[object]:
    """A modeller in this process over a fresh in-memory transport; cleaned up after."""
    from executor.testing import InMemoryTransport, LocalModeller

    transport = InMemoryTransport()
    m = LocalModeller(transport)
    yield m
    m.close()
    transport.close()


@pytest.fixture
def make_executor(docker_client: object, run_dir: Path, tmp_path: Path) -> Iterator[object]:
    """Build executors on the real engine; afterwards nothing they made may remain.

    Each executor gets a private spool directory (unless the test names one),
    so that a spool it leaks is seen here and not mistaken for another's. The
    check runs even when the test failed, and whatever leaked (containers,
    task directories, spools) is removed before the assertion reports it.
    """
    from executor.runner import Executor

    made: list[Executor] = []

    def factory(**kwargs: object) -> Executor:
        if "policies" in kwargs:
            kwargs["policies"] = bounded_set(kwargs["policies"])  # type: ignore[arg-type]
        else:
            kwargs["policy"] = bounded(kwargs.get("policy") or IsolationPolicy.hardened())  # type: ignore[arg-type]
        kwargs.setdefault("spool_dir", tmp_path / f"executor-spool-{len(made)}")
        ex = Executor(run_dir=run_dir, **kwargs)  # type: ignore[arg-type]
        made.append(ex)
        return ex

    yield factory
    for ex in made:
        ex.close()  # tears warm pools down
    leaked_containers = []
    for ex in made:
        for c in docker_client.containers.list(  # type: ignore[attr-defined]
            all=True, filters={"label": f"{LABEL_PARENT}={ex.instance_id}"}
        ):
            leaked_containers.append(c.name)
            c.remove(force=True)
    leaked_paths = sorted(str(p) for p in run_dir.iterdir())
    leaked_spools = []
    for ex in made:
        for p in sorted(ex.spool_dir.iterdir()) if ex.spool_dir.is_dir() else []:
            leaked_spools.append(str(p))
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink()
    assert not leaked_containers, f"containers left behind: {leaked_containers}"
    assert not leaked_paths, f"task directories left behind: {leaked_paths}"
    assert not leaked_spools, f"mailbox spools left behind: {leaked_spools}"
