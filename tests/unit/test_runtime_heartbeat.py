"""The runtime's heartbeat thread against a fake parent: BEAT_SEEN, and leaving when the parent is gone."""

from __future__ import annotations

import io
import threading
from typing import TYPE_CHECKING

import grpc
import pytest

from executor.sandbox import runtime
from executor.sandbox.init import EXIT_PARENT_GONE
from executor.v1 import sandbox_pb2 as pb

from .conftest import wait_for

if TYPE_CHECKING:
    from collections.abc import Iterator


class LostParent(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


class FakeStub:
    """Answers the beat stream with ``controls``, then fails (or holds it open until ``release``)."""

    def __init__(self, controls: list[int], fail: bool) -> None:
        self.controls = controls
        self.fail = fail
        self.release = threading.Event()

    def Heartbeat(self, beats: Iterator[pb.Beat], metadata: object = None) -> Iterator[pb.Control]:
        next(beats)
        for kind in self.controls:
            yield pb.Control(kind=kind)
        if self.fail:
            raise LostParent()
        self.release.wait(10)


class FakeClient:
    progress_events = 0
    mailbox_ops = 0
    metadata = ()

    def __init__(self, stub: FakeStub) -> None:
        self.stub = stub


@pytest.fixture
def exits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Exit statuses the runtime asked for, instead of leaving the test process."""
    codes: list[int] = []
    monkeypatch.setattr(runtime.os, "_exit", codes.append)
    return codes


def test_protocol_code_waits_for_the_parent_to_see_a_beat(exits):
    stub = FakeStub([], fail=False)
    heartbeat = runtime.Heartbeat(FakeClient(stub), 0.05)  # type: ignore[arg-type]
    heartbeat.start()
    try:
        assert not heartbeat.wait_seen(0.3)
    finally:
        heartbeat.stop()
        stub.release.set()
    stub = FakeStub([pb.Control.BEAT_SEEN], fail=False)
    heartbeat = runtime.Heartbeat(FakeClient(stub), 0.05)  # type: ignore[arg-type]
    heartbeat.start()
    try:
        assert heartbeat.wait_seen(5)
    finally:
        heartbeat.stop()
        stub.release.set()
    assert exits == []


def test_the_runtime_leaves_when_the_parent_is_gone_even_with_stderr_closed(exits, monkeypatch):
    closed = io.StringIO()
    closed.close()
    monkeypatch.setattr(runtime.sys, "stderr", closed)
    heartbeat = runtime.Heartbeat(FakeClient(FakeStub([pb.Control.BEAT_SEEN], fail=True)), 0.05)  # type: ignore[arg-type]
    heartbeat.start()
    assert wait_for(lambda: exits == [EXIT_PARENT_GONE])
