"""A metric: a report kind added end to end through the one event pipe (wire, check, charge, hook)."""

from __future__ import annotations

import json
import math
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from executor.events import Event, Metric, TaskContext
from executor.hooks import EventsFile, HookDispatcher
from executor.rpc.limits import PROGRESS_BURST, PROGRESS_RATE_LIMITED, CallLimiter
from executor.rpc.server import TaskServer
from executor.sandbox.client import ParentClient
from executor.sandbox.context import Context, ReportRefused
from executor.sandbox.contract import MAX_COLUMN_NAME_CHARS, TOKEN_METADATA_KEY, ReportCase
from executor.task.eventflow import TaskEvents
from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc
from tests.unit.conftest import SessionKit, wait_for

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

CTX = TaskContext(task_id="t-m", task_hash="h", project="p", modeller="m", datasource="d")


@pytest.fixture
def ctx_of(tmp_path: Path) -> Iterator[Callable[[SessionKit], Context]]:
    """A sandbox ``Context`` connected to a real task server for ``kit``'s session."""
    cleanups: list[Callable[[], None]] = []

    def make(kit: SessionKit) -> Context:
        sock_dir = Path(tempfile.mkdtemp(prefix="se-metric-", dir="/tmp"))
        cleanups.append(lambda: shutil.rmtree(sock_dir, ignore_errors=True))
        token = secrets.token_urlsafe(32)
        server = TaskServer(kit.session, token, sock_dir / "s.sock")
        server.start()
        cleanups.append(lambda: server.stop(grace=0.2))
        channel = grpc.insecure_channel(f"unix:{sock_dir / 's.sock'}", options=[("grpc.enable_retries", 0)])
        cleanups.append(channel.close)
        client = ParentClient(pb_grpc.SandboxStub(channel), ((TOKEN_METADATA_KEY, token),))
        return Context(pb.TaskConfig(task_id=kit.task_id), client, tmp_path / "scratch")

    yield make
    for cleanup in reversed(cleanups):
        cleanup()


def test_a_metric_goes_from_the_protocol_to_a_hook_as_a_typed_event(make_session, ctx_of, tmp_path):
    kit = make_session()
    ctx_of(kit).report("metric", name="loss", value=0.25)
    [metric] = kit.progress  # every event the session hands on, whatever its kind
    assert isinstance(metric, Metric)
    assert (metric.name, metric.value) == ("loss", 0.25)
    # The run loop hands it on as it is, bound to its task and batch.
    got: list[Event] = []
    events_file = EventsFile(tmp_path / "events.jsonl")
    events = TaskEvents(HookDispatcher([got.append, events_file]), CTX)
    events.report(metric, 2)
    assert wait_for(lambda: len(got) == 1)
    events.close(5.0)
    events_file.close()
    assert isinstance(got[0], Metric)
    assert (got[0].task, got[0].batch) == (CTX, 2)
    line = json.loads((tmp_path / "events.jsonl").read_text())
    assert {k: line[k] for k in ("event", "task_id", "batch", "name", "value")} == {
        "event": "metric",
        "task_id": "t-m",
        "batch": 2,
        "name": "loss",
        "value": 0.25,
    }


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("", 1.0),
        ("n" * (MAX_COLUMN_NAME_CHARS + 1), 1.0),
        ("loss\x1b[31m", 1.0),
        ("loss\nforged", 1.0),
        ("\ud800", 1.0),
        ("loss", math.nan),
        ("loss", math.inf),
        ("loss", -math.inf),
    ],
)
def test_the_parent_refuses_a_metric_no_protocol_may_report(make_session, ctx_of, name, value):
    kit = make_session()
    ctx = ctx_of(kit)
    with pytest.raises(ReportRefused) as refused:
        ctx.report("metric", name=name, value=value)
    # A name the child cannot even encode is refused before it is sent.
    assert refused.value.code in ("INVALID_ARGUMENT", "")
    assert kit.progress == []
    ctx.report("metric", name="n" * MAX_COLUMN_NAME_CHARS, value=-1e308)  # the edges pass
    assert len(kit.progress) == 1


def test_metrics_are_charged_as_the_events_for_every_hook_they_are():
    limiter = CallLimiter()
    assert [limiter.report(ReportCase.METRIC, 1) for _ in range(PROGRESS_BURST)] == [None] * PROGRESS_BURST
    assert limiter.report(ReportCase.METRIC, 1) == PROGRESS_RATE_LIMITED
    # One bucket with progress: a metric flood cannot buy a protocol more events.
    assert limiter.report(ReportCase.PROGRESS, 1) == PROGRESS_RATE_LIMITED
