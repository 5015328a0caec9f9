"""The parent's control kinds on the heartbeat stream: each one is sent, and none is dead.

SHUTDOWN was removed (reserved in the proto): the parent never sent it. A
sandbox exits by itself after its result, and every other end is a kill.
"""

from __future__ import annotations

from pathlib import Path

from executor.v1 import sandbox_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
# Where the parent sends each kind.
SENDERS = {
    "BEAT_SEEN": "executor/rpc/session.py",
    "MODELLER_READY": "executor/runner.py",
    "CANCEL": "executor/supervisor.py",
}


def test_every_control_kind_has_a_sender_in_the_parent():
    kinds = set(pb.Control.Kind.keys()) - {"KIND_UNSPECIFIED"}
    assert kinds == set(SENDERS)
    for kind, module in SENDERS.items():
        assert f'"{kind}"' in (REPO / module).read_text(), f"{module} no longer sends {kind}"


def test_shutdown_is_reserved_so_its_number_is_never_reused():
    proto = (REPO / "proto/executor/v1/sandbox.proto").read_text()
    assert "reserved 3;" in proto and 'reserved "SHUTDOWN";' in proto
    names = list(pb.Control.Kind.keys())
    assert "SHUTDOWN" not in names
