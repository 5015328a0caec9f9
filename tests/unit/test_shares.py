"""Secure shares in the parent: counted, capped per task, and bound to their task and pods."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from executor.mailbox.broker import MAX_TASK_SHARES, MailboxBroker, MailboxLimitError
from executor.mailbox.crypto import TaskKeys, seal_share, share_label
from executor.mailbox.transport import Envelope, Route
from executor.rpc.session import MAX_SHARES, RequestRejected, TaskSession
from executor.testing import InMemoryTransport

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SEALED_BYTES = KEY.key_size // 8


@pytest.fixture
def transport() -> Iterator[InMemoryTransport]:
    t = InMemoryTransport(max_queued_messages=2 * MAX_TASK_SHARES)
    yield t
    t.close()


def _broker(
    transport: InMemoryTransport,
    tmp_path: Path,
    route: Route,
    *,
    max_task_bytes: int = 64 * 1024 * 1024,
) -> MailboxBroker:
    keys = TaskKeys(
        aes_key=os.urandom(32),
        pod_private_key=KEY,
        # One key stands for every peer: the tests count shares, not keys.
        peer_public_keys={p: KEY.public_key() for p in route.peers},
    )
    return MailboxBroker(
        route,
        transport.open(route),
        keys,
        tmp_path / f"spool-{route.task_id}-{route.pod_identifier}",
        max_message_bytes=1024 * 1024,
        max_task_bytes=max_task_bytes,
    )


def test_shares_count_against_the_task_byte_quota(transport, tmp_path):
    route = Route("t-1", "pod-a", peers=("pod-b", "pod-c", "pod-d"))
    broker = _broker(transport, tmp_path, route, max_task_bytes=3 * SEALED_BYTES + 10)
    session = TaskSession("t-1", b"", broker, max_result_bytes=1024)
    try:
        session.send_secure_shares({"pod-b": b"1", "pod-c": b"2", "pod-d": b"3"})
        with pytest.raises(RequestRejected) as info:
            session.send_secure_shares({"pod-b": b"4"})
        assert info.value.code == "RESOURCE_EXHAUSTED"
    finally:
        broker.close()


def test_a_task_may_send_only_so_many_shares(transport, tmp_path):
    peers = tuple(f"pod-{i}" for i in range(MAX_SHARES))
    route = Route("t-1", "pod-a", peers=peers)
    broker = _broker(transport, tmp_path, route)
    session = TaskSession("t-1", b"", broker, max_result_bytes=1024)
    try:
        for _ in range(MAX_TASK_SHARES // MAX_SHARES):
            session.send_secure_shares({p: b"s" for p in peers})
        with pytest.raises(RequestRejected) as info:
            session.send_secure_shares({peers[0]: b"s"})
        assert info.value.code == "RESOURCE_EXHAUSTED"
    finally:
        broker.close()


def test_a_task_may_receive_only_so_many_shares(transport, tmp_path):
    route = Route("t-1", "pod-b", peers=("pod-a",))
    broker = _broker(transport, tmp_path, route)
    session = TaskSession("t-1", b"", broker, max_result_bytes=1024)
    flooder = transport.open(Route("t-1", "pod-x"))
    try:
        # Shares from a pod that is not a peer are dropped unopened, but each one counts.
        for _ in range(MAX_TASK_SHARES + 1):
            flooder.send(Envelope("SECURE_SHARE", b"s" * SEALED_BYTES, peer="pod-b"))
        with pytest.raises(RequestRejected) as info:
            session.get_secure_shares(5.0)
        assert info.value.code == "RESOURCE_EXHAUSTED"
    finally:
        broker.close()


def test_a_share_sealed_for_another_task_or_pod_is_dropped_not_opened(transport, tmp_path, caplog):
    route = Route("t-2", "pod-b", peers=("pod-a",))
    broker = _broker(transport, tmp_path, route)
    sender = transport.open(Route("t-2", "pod-a", peers=("pod-b",)))
    try:
        for label in (share_label("t-1", "pod-a", "pod-b"), share_label("t-2", "pod-a", "pod-c")):
            sender.send(Envelope("SECURE_SHARE", seal_share(KEY.public_key(), b"stale", label), peer="pod-b"))
        with caplog.at_level(logging.WARNING, logger="executor.mailbox.broker"):
            assert broker.get_shares(0.5) is None
        assert caplog.text.count("not sealed for this task and pod") == 2
        good = seal_share(KEY.public_key(), b"fresh", share_label("t-2", "pod-a", "pod-b"))
        sender.send(Envelope("SECURE_SHARE", good, peer="pod-b"))
        assert broker.get_shares(5.0) == {"pod-a": b"fresh"}
    finally:
        broker.close()


def test_shares_between_two_brokers_of_one_task_and_none_for_a_later_task(transport, tmp_path):
    a = _broker(transport, tmp_path, Route("t-1", "pod-a", peers=("pod-b",)))
    b = _broker(transport, tmp_path, Route("t-1", "pod-b", peers=("pod-a",)))
    later = _broker(transport, tmp_path, Route("t-2", "pod-b", peers=("pod-a",)))
    try:
        a.send_shares({"pod-b": b"a->b"})
        assert later.get_shares(0.3) is None
        assert b.get_shares(5.0) == {"pod-a": b"a->b"}
    finally:
        for broker in (a, b, later):
            broker.close()


def test_the_share_limit_is_refused_before_any_work(transport, tmp_path):
    route = Route("t-1", "pod-a", peers=("pod-b",))
    broker = _broker(transport, tmp_path, route, max_task_bytes=SEALED_BYTES - 1)
    try:
        with pytest.raises(MailboxLimitError):
            broker.send_shares({"pod-b": b"s"})
        assert transport.open(Route("t-1", "pod-b")).receive("SECURE_SHARE", 0.0) is None
    finally:
        broker.close()
