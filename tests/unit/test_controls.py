"""The parent's control kinds on the heartbeat stream: each one is sent, and none is dead.

SHUTDOWN was removed (reserved in the proto): the parent never sent it. A
sandbox exits by itself after its result, and every other end is a kill.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from executor.events import Control, ControlKind
from executor.rpc import serde
from executor.v1 import sandbox_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
# Where the parent sends each kind.
SENDERS = {
    ControlKind.BEAT_SEEN: "executor/rpc/session.py",
    ControlKind.MODELLER_READY: "executor/task/modeller.py",
    ControlKind.CANCEL: "executor/task/supervisor.py",
}


def test_the_parent_knows_every_control_kind_of_the_proto():
    assert {k.value for k in ControlKind} == set(pb.Control.Kind.keys()) - {"KIND_UNSPECIFIED"}


def test_every_control_kind_has_a_sender_in_the_parent():
    assert set(SENDERS) == set(ControlKind)
    for kind, module in SENDERS.items():
        assert f"ControlKind.{kind.name}" in (REPO / module).read_text(), f"{module} no longer sends {kind}"


@pytest.mark.parametrize("kind", list(ControlKind))
def test_each_control_becomes_its_proto_kind_with_its_reason(kind):
    message = serde.control_message(Control(kind, "why"))
    assert pb.Control.Kind.Name(message.kind) == kind.value
    assert message.reason == "why"


def test_shutdown_is_reserved_so_its_number_is_never_reused():
    proto = (REPO / "proto/executor/v1/sandbox.proto").read_text()
    assert "reserved 3;" in proto
    assert 'reserved "SHUTDOWN";' in proto
    names = list(pb.Control.Kind.keys())
    assert "SHUTDOWN" not in names
