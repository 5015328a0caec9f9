"""The transports that come with the package: what they hold, for whom, and for how long."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from executor.mailbox.transport import (
    SPOOL_OWNER,
    Envelope,
    NoModellerTransport,
    Route,
    TransportError,
)
from executor.task.reaper import new_instance_id, reap
from executor.testing import InMemoryTransport

REPO = Path(__file__).resolve().parents[2]


class NoContainers:
    """A backend with nothing to reap: these tests are about spools."""

    def list_managed(self) -> list[tuple[str, dict[str, str]]]:
        return []

    def remove(self, container_id: str) -> None:  # pragma: no cover - never called
        raise AssertionError(container_id)


@pytest.fixture
def spool_base(tmp_path, monkeypatch):
    """The executor's spool base, private to the test."""
    base = tmp_path / "spool"
    monkeypatch.setenv("SANDBOX_EXECUTOR_SPOOL_DIR", str(base))
    return base


# -- no modeller ---------------------------------------------------------------


def test_without_a_modeller_sends_are_counted_and_dropped_and_receives_fail(tmp_path):
    transport = NoModellerTransport()
    channel = transport.open(Route("t-1"))
    big = tmp_path / "sealed"
    big.write_bytes(b"z" * 5000)
    channel.send(Envelope("TRAINING_UPDATE", b"x" * 100))
    channel.send(Envelope("TRAINING_UPDATE", big))
    channel.send(Envelope("SECURE_SHARE", b"s" * 256, peer="pod-b"))

    counted = transport.discarded("t-1")
    assert (counted.messages, counted.bytes) == (3, 100 + 5000 + 256)
    assert not big.exists()  # a file body is deleted at once, not kept
    assert transport.discarded("another-task").messages == 0
    for message_type in ("MODELLER_RESPONSE", "TASK_START", "SECURE_SHARE"):
        with pytest.raises(TransportError, match="no modeller"):
            channel.receive(message_type, 5.0)
    channel.close()
    transport.close()


def test_an_executor_without_a_transport_has_no_modeller_and_closes_what_it_made():
    from executor.runner import Executor

    made = Executor(backend=NoContainers())  # type: ignore[arg-type]
    assert isinstance(made.transport, NoModellerTransport)

    closed: list[bool] = []

    class Given(InMemoryTransport):
        def close(self) -> None:
            closed.append(True)
            super().close()

    given = Given()
    with Executor(backend=NoContainers(), transport=given):  # type: ignore[arg-type]
        pass
    assert closed == []  # the caller's transport stays the caller's to close
    given.close()


# -- in memory: caps -------------------------------------------------------------


def test_a_modeller_that_never_reads_cannot_make_the_transport_hoard(tmp_path):
    transport = InMemoryTransport(
        spool_dir=tmp_path, max_queued_messages=5, max_queued_memory_bytes=1000, max_queued_bytes=3000
    )
    channel = transport.open(Route("t-1"))
    for _ in range(5):
        channel.send(Envelope("TRAINING_UPDATE", b"x" * 10))
    with pytest.raises(TransportError, match="at most 5 messages"):
        channel.send(Envelope("TRAINING_UPDATE", b"x"))
    assert transport.held("t-1") == (5, 50)
    # Reading frees room.
    assert transport.from_pod("t-1", 1.0) is not None
    channel.send(Envelope("TRAINING_UPDATE", b"x" * 10))
    while transport.from_pod("t-1", 0.0) is not None:
        pass
    assert transport.held("t-1") == (0, 0)

    # Bodies in memory have a cap of their own ...
    channel.send(Envelope("TRAINING_UPDATE", b"x" * 1000))
    with pytest.raises(TransportError, match="1000 bytes in memory"):
        channel.send(Envelope("TRAINING_UPDATE", b"x"))
    # ... and files count towards the total, and a refused file is not taken.
    body = tmp_path / "sealed-1"
    body.write_bytes(b"y" * 1500)
    channel.send(Envelope("TRAINING_UPDATE", body))
    refused = tmp_path / "sealed-2"
    refused.write_bytes(b"y" * 501)
    with pytest.raises(TransportError, match="3000 bytes in all"):
        channel.send(Envelope("TRAINING_UPDATE", refused))
    assert refused.exists()
    assert transport.held("t-1") == (2, 2500)
    # Another task has room of its own.
    transport.open(Route("t-2")).send(Envelope("TRAINING_UPDATE", b"x" * 1000))
    transport.close()


def test_what_the_modeller_sent_a_task_is_dropped_when_the_task_ends(tmp_path):
    transport = InMemoryTransport(spool_dir=tmp_path)
    body = tmp_path / "model"
    body.write_bytes(b"m" * 100)
    transport.to_pod("t-1", Envelope("ALGORITHM_EXCHANGE", b"small"))
    transport.to_pod("t-1", Envelope("MODELLER_RESPONSE", body))
    channel = transport.open(Route("t-1"))
    channel.close()
    assert [p.name for p in tmp_path.iterdir()] == []  # the spooled body is gone too
    again = transport.open(Route("t-1"))
    assert again.receive("ALGORITHM_EXCHANGE", 0.0) is None
    transport.close()


# -- in memory: shares are routed by task and pod -------------------------------


def test_a_share_reaches_the_same_task_on_the_peer_and_no_later_task():
    transport = InMemoryTransport()
    sender = transport.open(Route("task-1", "pod-a", peers=("pod-b",)))
    sender.send(Envelope("SECURE_SHARE", b"for task 1", peer="pod-b"))

    later = transport.open(Route("task-2", "pod-b", peers=("pod-a",)))
    assert later.receive("SECURE_SHARE", 0.3) is None
    same = transport.open(Route("task-1", "pod-b", peers=("pod-a",)))
    got = same.receive("SECURE_SHARE", 1.0)
    assert got is not None
    assert (got.body, got.peer) == (b"for task 1", "pod-a")

    # What arrives for a task that has ended is dropped with it.
    sender.send(Envelope("SECURE_SHARE", b"too late", peer="pod-b"))
    same.close()
    assert transport.open(Route("task-1", "pod-b")).receive("SECURE_SHARE", 0.0) is None
    transport.close()


def test_a_task_without_a_pod_cannot_reach_peers():
    transport = InMemoryTransport()
    with pytest.raises(TransportError, match="pod identifier"):
        transport.open(Route("t")).send(Envelope("SECURE_SHARE", b"s", peer="pod-b"))
    transport.close()


def test_the_modeller_addresses_each_pod_of_a_task_that_shares_one_id():
    transport = InMemoryTransport()
    a = transport.open(Route("task-1", "pod-a"))
    b = transport.open(Route("task-1", "pod-b"))
    transport.to_pod("task-1", Envelope("MODELLER_RESPONSE", b"to a"), "pod-a")
    a.send(Envelope("TRAINING_UPDATE", b"from a"))
    assert b.receive("MODELLER_RESPONSE", 0.2) is None
    got = a.receive("MODELLER_RESPONSE", 1.0)
    assert got is not None
    assert got.body == b"to a"
    assert transport.from_pod("task-1", 0.0, "pod-b") is None
    sent = transport.from_pod("task-1", 1.0, "pod-a")
    assert sent is not None
    assert sent.body == b"from a"
    transport.close()


# -- spools belong to the reaper ---------------------------------------------------


def test_the_default_spool_lives_under_the_spool_base_and_close_removes_it(spool_base, tmp_path):
    from executor.testing import LocalModeller

    transport = InMemoryTransport()
    modeller = LocalModeller(transport)
    body = tmp_path / "sealed"
    body.write_bytes(b"x" * 10)
    transport.open(Route("t")).send(Envelope("TRAINING_UPDATE", body))
    spools = sorted(spool_base.iterdir())
    assert [p.name.split("-")[0] for p in spools] == ["modeller", "transport"]
    for spool in spools:
        assert (spool / SPOOL_OWNER).read_text().split(":")[1] == str(os.getpid())
    # A live process's spools are not a dead executor's leftovers.
    assert reap(NoContainers(), tmp_path / "run", spool_base).spools == []  # type: ignore[arg-type]
    modeller.close()
    transport.close()
    assert list(spool_base.iterdir()) == []


LEAVER = r"""
import json, os, sys
from pathlib import Path
from executor.testing import LocalModeller
from executor.mailbox.transport import Envelope, Route
from executor.testing import InMemoryTransport

transport = InMemoryTransport()
modeller = LocalModeller(transport)
body = Path(sys.argv[1])
body.write_bytes(b"x" * (5 * 1024 * 1024))
transport.open(Route("t")).send(Envelope("TRAINING_UPDATE", body))
print(json.dumps(sorted(str(p) for p in Path(os.environ["SANDBOX_EXECUTOR_SPOOL_DIR"]).iterdir())))
sys.stdout.flush()
os._exit(0)  # dies without closing anything, as a crash or SIGKILL would
"""


def test_reap_removes_the_transport_spools_of_a_dead_process(spool_base, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", LEAVER, str(tmp_path / "big")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "SANDBOX_EXECUTOR_SPOOL_DIR": str(spool_base)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    left = json.loads(proc.stdout)
    assert len(left) == 2  # the transport's spool (holding the body) and the modeller's
    live = spool_base / "transport-live"
    live.mkdir()
    (live / SPOOL_OWNER).write_text(new_instance_id())

    report = reap(NoContainers(), tmp_path / "run", spool_base)  # type: ignore[arg-type]

    assert sorted(report.spools) == left
    assert sorted(spool_base.iterdir()) == [live]
