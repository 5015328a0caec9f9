"""Result rows from protocol code to the parent: ctx.save_results -> Report(rows) -> TaskSession.

Every row is untrusted: the session keeps a call's rows only if each is one
flat JSON object of scalars within the caps, and keeps none of them otherwise.
Tested on the session itself, through a real task server on a Unix socket,
from a protocol's ``ctx`` and from the real runtime in a subprocess.
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import tracemalloc
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest

from executor.data import resultrows
from executor.data.resultrows import TaskRows
from executor.errors import ProjectDatabaseError
from executor.rpc import checks as checks_module
from executor.rpc import limits as limits_module
from executor.rpc.limits import RATE_BURST, RATE_LIMITED, RATE_PER_S, ROWS_PER_TOKEN, CallLimiter
from executor.rpc.server import TaskServer
from executor.rpc.servicer import SandboxServicer
from executor.rpc.session import RequestRejected, TaskSession
from executor.sandbox import client as client_module
from executor.sandbox import results as results_module
from executor.sandbox.client import ParentClient
from executor.sandbox.context import Context, ReportRefused, SandboxError
from executor.sandbox.contract import (
    MAX_COLUMN_NAME_CHARS,
    MAX_COLUMNS,
    MAX_ROW_BYTES,
    MAX_ROWS_BYTES_PER_CALL,
    MAX_ROWS_PER_CALL,
    RATE_LIMITED_TRAILER,
    TOKEN_METADATA_KEY,
)
from executor.v1 import sandbox_pb2 as pb
from executor.v1 import sandbox_pb2_grpc as pb_grpc
from tests.unit.conftest import SessionKit, wait_for
from tests.unit.test_runtime_start import REPO, RUNTIME
from tests.unit.test_runtime_start import _config as runtime_config

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

pytestmark = pytest.mark.timeout(60)

RPC_TIMEOUT = 10
INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


def _rejected(code: str, fn: Callable[..., object], *args: object) -> str:
    with pytest.raises(RequestRejected) as info:
        fn(*args)
    assert info.value.code == code, info.value.public_message
    return info.value.public_message


def _finish(session: TaskSession) -> None:
    session.report_finish("OK", "null", "", "", "", {})


def _row_of_bytes(size: int, **extra: Any) -> str:
    """Compact row text of exactly ``size`` UTF-8 bytes (one padded string column)."""
    base = json.dumps({**extra, "pad": ""}, separators=(",", ":"))
    text = base[:-2] + "x" * (size - len(base.encode())) + '"}'
    assert len(text.encode()) == size
    return text


# -- the session: what it keeps ------------------------------------------------------------


def test_rows_are_kept_in_order_across_calls_with_their_types(make_session):
    kit = make_session()
    session = kit.session
    session.save_results(['{"file": "a.csv", "n": 3, "mean": 1.5, "ok": true, "note": null}'])
    session.save_results(['{"file": "b.csv", "n": -7}', '{"file": "c.csv", "mean": 1E2}'])
    rows = kit.saved()
    assert rows == [
        {"file": "a.csv", "n": 3, "mean": 1.5, "ok": True, "note": None},
        {"file": "b.csv", "n": -7},
        {"file": "c.csv", "mean": 100.0},
    ]
    assert [type(v) for v in rows[0].values()] == [str, int, float, bool, type(None)]
    assert list(rows[0]) == ["file", "n", "mean", "ok", "note"], "column order is kept"


def test_a_calls_rows_are_handed_on_before_it_returns_and_the_session_keeps_none(make_session):
    # Finding 3 of the third red team: every row of a batch was held in the parent
    # (~0.9 GiB for 32 MiB of rows). Made to fail by keeping each call's texts in
    # the session (a list that grows): the traced peak then passes the bound.
    stored: list[list[str]] = []
    kit = make_session(
        task_rows=TaskRows(max_rows=10**6, max_bytes=10**9, store=lambda _, rows: stored.append(rows))
    )
    kit.session.save_results(['{"a": 1}'])
    assert stored == [['{"a": 1}']], "the call's row has not reached the store before the call returned"
    size = MAX_ROWS_BYTES_PER_CALL // 16 - 8
    tracemalloc.start()
    try:
        for n in range(resultrows.MAX_ROWS_BYTES_PER_BATCH // MAX_ROWS_BYTES_PER_CALL - 1):
            # Fresh texts for each call, as each request brings: about 1 MiB a call.
            kit.session.save_results([_row_of_bytes(size, i=n * 16 + i) for i in range(16)])
            stored.clear()  # the store took them (the project database keeps them on disk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kit.rows is not None
    assert kit.rows.bytes > 30 * MAX_ROWS_BYTES_PER_CALL
    assert peak < 8 * MAX_ROWS_BYTES_PER_CALL, f"{peak / 2**20:.1f} MiB held while saving 31 MiB of rows"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f'{{"max": {INT64_MAX}, "min": {INT64_MIN}}}', {"max": INT64_MAX, "min": INT64_MIN}),
        ('{"big": 1.7976931348623157e308, "tiny": 5e-324, "neg0": -0.0}', None),
        ('{"emoji": "\\ud83d\\ude00", "raw": "\U0001f600", "accent": "caf\\u00e9"}', None),
        ('{"nul in a value": "a\\u0000b", "newline": "x\\ny"}', None),
        ('  {"spaced" :  1 }  ', {"spaced": 1}),
        ('{"\\u00e9t\\u00e9": 1, "col with spaces": "", "sp\\u00e4ter": false}', None),
        ('{"k": "' + "a" * 1000 + '"}', None),
    ],
    ids=[
        "int64-bounds",
        "float-extremes",
        "unicode",
        "control-in-values",
        "whitespace",
        "names",
        "long-value",
    ],
)
def test_every_json_scalar_is_accepted(make_session, text, expected):
    kit = make_session()
    session = kit.session
    session.save_results([text])
    assert kit.saved() == [expected if expected is not None else json.loads(text)]


# -- the session: every refusal class --------------------------------------------------------

BAD_ROWS = {
    "not-json": ("{not json", "is not valid JSON"),
    "single-quotes": ("{'a': 1}", "is not valid JSON"),
    "trailing-garbage": ('{"a": 1} x', "is not valid JSON"),
    "truncated": ('{"a": 1', "is not valid JSON"),
    "empty-text": ("", "is not valid JSON"),
    "deep-nesting": ('{"a": ' + "[" * 30_000 + "]" * 30_000 + "}", "is not valid JSON"),
    "array": ("[1, 2]", "is not a JSON object"),
    "string": ('"row"', "is not a JSON object"),
    "number": ("1", "is not a JSON object"),
    "null": ("null", "is not a JSON object"),
    "empty-object": ("{}", "must have 1 to 256 columns"),
    "nested-list": ('{"a": [1, 2]}', "not a JSON scalar"),
    "nested-dict": ('{"a": {"b": 1}}', "not a JSON scalar"),
    "empty-list": ('{"a": []}', "not a JSON scalar"),
    "nan": ('{"a": NaN}', "holds NaN, which is not JSON"),
    "infinity": ('{"a": Infinity}', "holds Infinity, which is not JSON"),
    "minus-infinity": ('{"a": -Infinity}', "holds -Infinity, which is not JSON"),
    "float-overflow": ('{"a": 1e400}', "outside the float range"),
    "int-above-int64": (f'{{"a": {INT64_MAX + 1}}}', "outside the signed 64-bit range"),
    "int-below-int64": (f'{{"a": {INT64_MIN - 1}}}', "outside the signed 64-bit range"),
    "int-of-5000-digits": ('{"a": ' + "9" * 5000 + "}", "outside the signed 64-bit range"),
    "duplicate-column": ('{"a": 1, "a": 2}', "repeats a column name"),
    "empty-name": ('{"": 1}', "column name"),
    "name-too-long": (json.dumps({"n" * (MAX_COLUMN_NAME_CHARS + 1): 1}), "column name"),
    "nul-in-name": ('{"a\\u0000b": 1}', "column name"),
    "newline-in-name": ('{"a\\nb": 1}', "column name"),
    "escape-in-name": ('{"\\u001b[31mred": 1}', "column name"),
    "c1-control-in-name": ('{"a\\u009bb": 1}', "column name"),
    "lone-surrogate-in-name": ('{"\\ud800": 1}', "column name"),
    "lone-surrogate-in-value": ('{"a": "x\\udfffy"}', "lone surrogate"),
    "reversed-pair-in-value": ('{"a": "\\ude00\\ud83d"}', "lone surrogate"),
}


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_a_row_that_is_not_one_flat_object_of_scalars_is_refused(make_session, case):
    text, why = BAD_ROWS[case]
    kit = make_session()
    session = kit.session
    message = _rejected("INVALID_ARGUMENT", session.save_results, [text])
    assert message.startswith("result row 0 "), message
    assert why in message
    assert len(message) < 200, "the public message never echoes the row"
    assert kit.saved() == []


def test_a_call_is_kept_whole_or_not_at_all(make_session):
    kit = make_session()
    session = kit.session
    session.save_results(['{"kept": 1}'])
    good = [json.dumps({"i": i}) for i in range(MAX_ROWS_PER_CALL - 1)]
    message = _rejected("INVALID_ARGUMENT", session.save_results, [*good, '{"i": [999]}'])
    assert message.startswith(f"result row {MAX_ROWS_PER_CALL - 1} "), "the message names the bad row"
    assert kit.saved() == [{"kept": 1}]


def test_a_lone_surrogate_from_a_direct_caller_is_refused(make_session):
    # protobuf refuses such a string on the wire; a caller in the parent might not.
    kit = make_session()
    session = kit.session
    message = _rejected("INVALID_ARGUMENT", session.save_results, ['{"a": 1}', '{"a": "\ud800"}'])
    assert message == "result row 1 holds a lone surrogate"
    assert kit.saved() == []


def test_rows_after_the_finish_are_refused(make_session):
    kit = make_session()
    session = kit.session
    session.save_results(['{"before": 1}'])
    _finish(session)
    message = _rejected("FAILED_PRECONDITION", session.save_results, ['{"after": 1}'])
    assert message == "the task has already finished"
    # What came before the finish is still there for the parent to commit.
    assert kit.saved() == [{"before": 1}]


def test_rows_after_the_parent_ended_the_task_are_refused(make_session):
    kit = make_session()
    session = kit.session
    assert session.end_for_abuse("RpcAbuse", "kept calling")
    _rejected("FAILED_PRECONDITION", session.save_results, ['{"a": 1}'])
    assert kit.saved() == []


def test_a_finish_that_lands_while_rows_are_checked_refuses_them(make_session, monkeypatch):
    kit = make_session()
    session = kit.session
    check = checks_module.check_row

    def finish_midway(text: str) -> None:
        if session.finish is None:
            _finish(session)  # the result arrives on another thread while this call parses
        check(text)

    monkeypatch.setattr(checks_module, "check_row", finish_midway)
    _rejected("FAILED_PRECONDITION", session.save_results, ['{"a": 1}', '{"a": 2}'])
    assert kit.saved() == []


# -- the session: caps exactly at and just beyond ---------------------------------------------


def test_result_row_caps_are_pinned():
    """Changing a cap changes what a task may make the parent hold: do it here, on purpose."""
    assert MAX_ROWS_PER_CALL == 1000
    assert MAX_ROWS_BYTES_PER_CALL == 1024 * 1024
    assert MAX_ROW_BYTES == 64 * 1024
    assert MAX_COLUMNS == 256
    assert MAX_COLUMN_NAME_CHARS == 128
    assert resultrows.MAX_ROWS_PER_BATCH == 100_000
    assert resultrows.MAX_ROWS_BYTES_PER_BATCH == 32 * 1024 * 1024
    # Parent and child enforce the same objects, not copies.
    assert resultrows.MAX_ROWS_PER_CALL is checks_module.MAX_ROWS_PER_CALL is results_module.MAX_ROWS_PER_CALL
    assert resultrows.MAX_ROW_BYTES is checks_module.MAX_ROW_BYTES is results_module.MAX_ROW_BYTES


def test_rows_per_call(make_session):
    kit = make_session()
    session = kit.session
    _rejected("INVALID_ARGUMENT", session.save_results, [])
    rows = ['{"a": 1}'] * MAX_ROWS_PER_CALL
    message = _rejected("INVALID_ARGUMENT", session.save_results, [*rows, '{"a": 1}'])
    assert message == f"expected 1 to {MAX_ROWS_PER_CALL} result rows"
    session.save_results(rows)
    assert len(kit.saved()) == MAX_ROWS_PER_CALL


def test_bytes_per_row_count_utf8_bytes_not_characters(make_session):
    kit = make_session()
    session = kit.session
    session.save_results([_row_of_bytes(MAX_ROW_BYTES)])
    message = _rejected("INVALID_ARGUMENT", session.save_results, [_row_of_bytes(MAX_ROW_BYTES + 1)])
    assert message == f"result row 0 is {MAX_ROW_BYTES + 1} bytes; the limit is {MAX_ROW_BYTES}"
    # Fewer characters than the cap, more bytes: "é" is two bytes.
    wide = '{"a": "' + "é" * (MAX_ROW_BYTES // 2) + '"}'
    assert len(wide) < MAX_ROW_BYTES < len(wide.encode())
    _rejected("INVALID_ARGUMENT", session.save_results, [wide])
    assert len(kit.saved()) == 1


def test_bytes_per_call(make_session):
    kit = make_session()
    session = kit.session
    per_call = MAX_ROWS_BYTES_PER_CALL // MAX_ROW_BYTES
    full = [_row_of_bytes(MAX_ROW_BYTES)] * per_call
    session.save_results(full)
    message = _rejected("INVALID_ARGUMENT", session.save_results, [*full, '{"a": 1}'])
    assert message == f"result rows of one call may hold at most {MAX_ROWS_BYTES_PER_CALL} bytes"
    assert len(kit.saved()) == per_call


def test_columns_per_row(make_session):
    kit = make_session()
    session = kit.session
    session.save_results([json.dumps({f"c{i}": i for i in range(MAX_COLUMNS)})])
    message = _rejected(
        "INVALID_ARGUMENT", session.save_results, [json.dumps({f"c{i}": i for i in range(MAX_COLUMNS + 1)})]
    )
    assert message == f"result row 0 must have 1 to {MAX_COLUMNS} columns"
    assert len(kit.saved()[0]) == MAX_COLUMNS


def test_column_name_characters(make_session):
    kit = make_session()
    session = kit.session
    longest = "é" * MAX_COLUMN_NAME_CHARS  # characters, not bytes
    session.save_results([json.dumps({longest: 1})])
    _rejected("INVALID_ARGUMENT", session.save_results, [json.dumps({longest + "é": 1})])
    assert kit.saved() == [{longest: 1}]


def test_rows_per_task(make_session):
    kit = make_session()
    session = kit.session
    call = ['{"a": 1}'] * MAX_ROWS_PER_CALL
    for _ in range(resultrows.MAX_ROWS_PER_BATCH // MAX_ROWS_PER_CALL - 1):
        session.save_results(call)
    session.save_results(call[:-1])
    # One short of the cap: a call of two is refused whole, a call of one fits it exactly.
    message = _rejected("RESOURCE_EXHAUSTED", session.save_results, ['{"a": 2}', '{"a": 3}'])
    assert message == f"at most {resultrows.MAX_ROWS_PER_BATCH} result rows per batch (99999 saved already)"
    session.save_results(['{"last": true}'])
    _rejected("RESOURCE_EXHAUSTED", session.save_results, ['{"a": 4}'])
    rows = kit.saved()
    assert len(rows) == resultrows.MAX_ROWS_PER_BATCH
    assert rows[-1] == {"last": True}


def test_bytes_per_task(make_session):
    kit = make_session()
    session = kit.session
    full = [_row_of_bytes(MAX_ROW_BYTES)] * (MAX_ROWS_BYTES_PER_CALL // MAX_ROW_BYTES)
    for _ in range(resultrows.MAX_ROWS_BYTES_PER_BATCH // MAX_ROWS_BYTES_PER_CALL - 1):
        session.save_results(full)
    session.save_results([*full[:-1], _row_of_bytes(MAX_ROW_BYTES - 9)])
    # 9 bytes left: a 10-byte row is refused, a 9-byte row fills the budget exactly.
    message = _rejected("RESOURCE_EXHAUSTED", session.save_results, ['{"ab": 12}'])
    assert message.startswith(f"at most {resultrows.MAX_ROWS_BYTES_PER_BATCH} bytes of result rows")
    session.save_results(['{"a": 12}'])
    _rejected("RESOURCE_EXHAUSTED", session.save_results, ["{}"])  # refused before it is parsed
    assert kit.rows is not None
    assert kit.rows.bytes == resultrows.MAX_ROWS_BYTES_PER_BATCH
    assert kit.saved()[-1] == {"a": 12}


def test_concurrent_calls_never_pass_the_task_cap(make_session, monkeypatch):
    monkeypatch.setattr(resultrows, "MAX_ROWS_PER_BATCH", 2500)
    kit = make_session()
    session = kit.session
    session.save_results(['{"a": 0}'] * 1000)
    outcomes: list[str] = []
    start = threading.Barrier(4)

    def save(n: int) -> None:
        start.wait()
        try:
            session.save_results([json.dumps({"thread": n})] * 1000)
            outcomes.append("kept")
        except RequestRejected as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(RPC_TIMEOUT)
    assert sorted(outcomes) == ["RESOURCE_EXHAUSTED"] * 3 + ["kept"]
    assert len(kit.saved()) == 2000


# -- the servicer through a real server on a Unix socket ---------------------------------------


@dataclass
class Served:
    """A task server for a session, a raw stub and a protocol's ctx on it."""

    kit: SessionKit
    session: TaskSession
    server: TaskServer
    stub: pb_grpc.SandboxStub
    auth: tuple[tuple[str, str], ...]
    ctx: Context
    client: ParentClient


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Serve a session on a fresh socket, with a stub and a ``Context`` on it; all closed after."""
    cleanups: list[Callable[[], None]] = []

    def make(kit: SessionKit, **server_kwargs: Any) -> Served:
        sock_dir = Path(tempfile.mkdtemp(prefix="se-rows-", dir="/tmp"))
        cleanups.append(lambda: shutil.rmtree(sock_dir, ignore_errors=True))
        token = secrets.token_urlsafe(32)
        server = TaskServer(kit.session, token, sock_dir / "s.sock", **server_kwargs)
        server.start()
        cleanups.append(lambda: server.stop(grace=0.2))
        channel = grpc.insecure_channel(f"unix:{sock_dir / 's.sock'}", options=[("grpc.enable_retries", 0)])
        cleanups.append(channel.close)
        stub = pb_grpc.SandboxStub(channel)
        auth = ((TOKEN_METADATA_KEY, token),)
        client = ParentClient(stub, auth)
        ctx = Context(pb.TaskConfig(task_id=kit.task_id, chunk_bytes=1024), client, tmp_path / "scratch")
        return Served(kit, kit.session, server, stub, auth, ctx, client)

    yield make
    for cleanup in reversed(cleanups):
        cleanup()


def _status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_save_results_over_the_wire(make_session, serve):
    s = serve(make_session())
    rows = pb.ResultRows(rows_json=['{"file": "a.csv", "n": 1}', '{"file": "b.csv", "n": 2}'])
    assert s.stub.Report(pb.ReportRequest(rows=rows), metadata=s.auth, timeout=RPC_TIMEOUT) == pb.Ack()
    assert s.kit.saved() == [{"file": "a.csv", "n": 1}, {"file": "b.csv", "n": 2}]


def test_refusals_over_the_wire_carry_their_code_and_reason(make_session, serve):
    s = serve(make_session())

    def save(*texts: str) -> tuple[grpc.StatusCode, str]:
        request = pb.ResultRows(rows_json=list(texts))
        return _status(
            lambda: s.stub.Report(pb.ReportRequest(rows=request), metadata=s.auth, timeout=RPC_TIMEOUT)
        )

    assert save('{"a": 1}', '{"a": {"nested": 1}}') == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "result row 1 has a value that is not a JSON scalar (string, number, boolean or null)",
    )
    assert save() == (grpc.StatusCode.INVALID_ARGUMENT, f"expected 1 to {MAX_ROWS_PER_CALL} result rows")
    unsigned = ((TOKEN_METADATA_KEY, "forged"),)
    code, _ = _status(
        lambda: s.stub.Report(
            pb.ReportRequest(rows=pb.ResultRows(rows_json=['{"a": 1}'])),
            metadata=unsigned,
            timeout=RPC_TIMEOUT,
        )
    )
    assert code is grpc.StatusCode.UNAUTHENTICATED
    _finish(s.session)
    assert save('{"a": 1}') == (grpc.StatusCode.FAILED_PRECONDITION, "the task has already finished")
    assert s.kit.saved() == []


def test_a_call_larger_than_the_message_cap_is_refused_and_the_server_still_answers(make_session, serve):
    s = serve(make_session())
    huge = pb.ResultRows(rows_json=[_row_of_bytes(MAX_ROW_BYTES)] * 40)  # 2.5 MiB: past any cap
    code, _ = _status(
        lambda: s.stub.Report(pb.ReportRequest(rows=huge), metadata=s.auth, timeout=RPC_TIMEOUT)
    )
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    # The largest call the contract allows fits the server's message cap.
    full = pb.ResultRows(
        rows_json=[_row_of_bytes(MAX_ROW_BYTES)] * (MAX_ROWS_BYTES_PER_CALL // MAX_ROW_BYTES)
    )
    s.stub.Report(pb.ReportRequest(rows=full), metadata=s.auth, timeout=RPC_TIMEOUT)
    many = pb.ResultRows(
        rows_json=[_row_of_bytes(MAX_ROWS_BYTES_PER_CALL // MAX_ROWS_PER_CALL)] * MAX_ROWS_PER_CALL
    )
    s.stub.Report(pb.ReportRequest(rows=many), metadata=s.auth, timeout=RPC_TIMEOUT)
    assert len(s.kit.saved()) == len(full.rows_json) + MAX_ROWS_PER_CALL


class _Aborted(Exception):
    pass


class _RecordingContext:
    code: grpc.StatusCode | None = None
    details = ""
    trailers: tuple[tuple[str, str], ...] = ()

    def set_trailing_metadata(self, trailers: tuple[tuple[str, str], ...]) -> None:
        self.trailers = tuple(trailers)

    def abort(self, code: grpc.StatusCode, details: str) -> None:
        self.code, self.details = code, details
        raise _Aborted


def test_rows_are_charged_to_the_task_per_ten(make_session):
    kit = make_session()
    session = kit.session
    servicer = SandboxServicer(session, CallLimiter(rate_per_s=0.001, burst=150))
    rows = pb.ResultRows(rows_json=['{"a": 1}'] * MAX_ROWS_PER_CALL)
    assert MAX_ROWS_PER_CALL // ROWS_PER_TOKEN <= 150 < 2 * (MAX_ROWS_PER_CALL // ROWS_PER_TOKEN)
    servicer.Report(pb.ReportRequest(rows=rows), _RecordingContext())  # type: ignore[arg-type]
    context = _RecordingContext()
    with pytest.raises(_Aborted):
        servicer.Report(pb.ReportRequest(rows=rows), context)  # type: ignore[arg-type]
    assert (context.code, context.details) == (grpc.StatusCode.RESOURCE_EXHAUSTED, RATE_LIMITED)
    assert context.trailers == ((RATE_LIMITED_TRAILER, "1"),)
    assert len(kit.saved()) == MAX_ROWS_PER_CALL, "the refused call kept nothing"


def test_a_task_saving_its_whole_row_cap_is_slowed_at_most_never_refused():
    # A full call must fit the burst (a call costing more is never admitted),
    # and the time the budget takes to refill for one must be shorter than the
    # child's backoff waits before it gives up.
    call_cost = 1 + MAX_ROWS_PER_CALL // ROWS_PER_TOKEN
    assert call_cost <= RATE_BURST
    backoff, delay = 0.0, client_module.RATE_BACKOFF_S
    for _ in range(client_module.RATE_RETRIES - 1):
        backoff += delay
        delay = min(delay * 2, 0.5)
    assert call_cost / RATE_PER_S < backoff / 4
    # The whole task cap in full calls: seconds of budget, not a rate kill.
    whole = resultrows.MAX_ROWS_PER_BATCH // MAX_ROWS_PER_CALL * call_cost
    assert (whole - RATE_BURST) / RATE_PER_S < 10


# -- the protocol's ctx ------------------------------------------------------------------------


def test_ctx_rows_reach_the_session_with_their_types(make_session, serve):
    s = serve(make_session())
    rows = [
        {"file": "a.csv", "n": 3, "mean": 0.1, "ok": True, "note": None, "name": "café ☕"},
        {"file": "b.csv", "n": INT64_MIN, "mean": -0.0, "ok": False},
    ]
    s.ctx.save_results(rows)
    s.ctx.save_results(iter([{"generated": i} for i in range(3)]))
    assert s.kit.saved() == [*rows, {"generated": 0}, {"generated": 1}, {"generated": 2}]


def test_ctx_splits_rows_into_calls_by_count_and_by_bytes(make_session, serve, monkeypatch):
    s = serve(make_session())
    calls: list[tuple[int, int]] = []
    real = s.session.save_results

    def counting(rows_json: list[str]) -> None:
        calls.append((len(rows_json), sum(len(text.encode()) for text in rows_json)))
        real(rows_json)

    monkeypatch.setattr(s.session, "save_results", counting)
    s.ctx.save_results({"i": i} for i in range(2 * MAX_ROWS_PER_CALL + 500))
    assert [rows for rows, _ in calls] == [MAX_ROWS_PER_CALL, MAX_ROWS_PER_CALL, 500]
    calls.clear()
    row_bytes = MAX_ROW_BYTES - 100
    pad = "x" * (row_bytes - len(json.dumps({"i": 10, "pad": ""}, separators=(",", ":"))))
    s.ctx.save_results([{"i": i, "pad": pad} for i in range(10, 50)])
    per_call = MAX_ROWS_BYTES_PER_CALL // row_bytes  # 16 rows of 65,436 bytes fit 1 MiB, 17 do not
    assert calls == [(per_call, per_call * row_bytes)] * 2 + [
        (40 - 2 * per_call, (40 - 2 * per_call) * row_bytes)
    ]
    saved = s.kit.saved()
    assert [row["i"] for row in saved] == [*range(2 * MAX_ROWS_PER_CALL + 500), *range(10, 50)]


class _Opaque:
    pass


LOCAL_REFUSALS: dict[str, tuple[object, str]] = {
    "a-single-dict": ({"a": 1}, "wrap a single row in a list"),
    "a-string": ("rows", "wrap a single row in a list"),
    "row-not-a-mapping": (
        [{"a": 1}, [("a", 1)]],
        f"result row {MAX_ROWS_PER_CALL + 2} is a list, not a dict",
    ),
    "empty-row": ([{}], f"result row {MAX_ROWS_PER_CALL + 1} must have 1 to {MAX_COLUMNS} columns"),
    "too-many-columns": ([{f"c{i}": 1 for i in range(MAX_COLUMNS + 1)}], f"1 to {MAX_COLUMNS} columns"),
    "int-key": ([{1: "a"}], "column 1, has a column name that is not"),
    "empty-key": ([{"": 1}], "column '', has a column name that is not"),
    "long-key": ([{"k" * (MAX_COLUMN_NAME_CHARS + 1): 1}], "characters free of control characters"),
    "nul-in-key": ([{"a\0": 1}], "column 'a\\x00', has a column name"),
    "nested-list": ([{"a": [1]}], "column 'a', has a value that is not a JSON scalar"),
    "nested-dict": ([{"a": {"b": 1}}], "column 'a', has a value that is not a JSON scalar"),
    "tuple": ([{"a": (1, 2)}], "not a JSON scalar"),
    "decimal": ([{"a": Decimal("1.5")}], "not a JSON scalar"),
    "object": ([{"a": _Opaque()}], "not a JSON scalar"),
    "bytes": ([{"a": b"x"}], "not a JSON scalar"),
    "nan": ([{"a": math.nan}], "column 'a', holds a number that is not finite"),
    "infinity": ([{"a": -math.inf}], "holds a number that is not finite"),
    "int-too-large": ([{"a": INT64_MAX + 1}], "integer outside the signed 64-bit range"),
    "lone-surrogate": ([{"a": "\udc00"}], "lone surrogate"),
    "row-too-large": ([{"a": "x" * MAX_ROW_BYTES}], f"the limit is {MAX_ROW_BYTES}"),
}


@pytest.mark.parametrize("case", sorted(LOCAL_REFUSALS))
def test_ctx_refuses_a_bad_row_before_sending_anything(make_session, serve, case):
    rows, why = LOCAL_REFUSALS[case]
    s = serve(make_session())
    good = [{"fine": i} for i in range(MAX_ROWS_PER_CALL + 1)]  # a full call's worth before the bad row
    with pytest.raises(ReportRefused) as info:
        s.ctx.save_results(rows if not isinstance(rows, list) else [*good, *rows])  # type: ignore[arg-type]
    assert why in str(info.value)
    assert info.value.code == "", "refused locally, not by the parent"
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, SandboxError)
    assert s.kit.saved() == []


def test_ctx_largest_row_is_accepted_by_the_parent(make_session, serve):
    s = serve(make_session())
    pad = MAX_ROW_BYTES - len('{"a":""}')
    s.ctx.save_results([{"a": "x" * pad}])
    with pytest.raises(ReportRefused):
        s.ctx.save_results([{"a": "x" * (pad + 1)}])
    assert s.kit.saved() == [{"a": "x" * pad}]


def test_a_parent_refusal_is_a_report_refused_with_its_code_and_what_was_saved(
    make_session, serve, monkeypatch
):
    monkeypatch.setattr(resultrows, "MAX_ROWS_PER_BATCH", 1500)
    s = serve(make_session())
    with pytest.raises(ReportRefused) as info:
        s.ctx.save_results({"i": i} for i in range(2500))
    assert info.value.code == "RESOURCE_EXHAUSTED"
    assert "result rows 1000 to 1999 refused: at most 1500 result rows per batch" in str(info.value)
    assert "(1000 row(s) of this call saved before them)" in str(info.value)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    assert len(s.kit.saved()) == 1000
    _finish(s.session)
    with pytest.raises(ReportRefused) as info:
        s.ctx.save_results([{"late": True}])
    assert info.value.code == "FAILED_PRECONDITION"


def test_ctx_with_the_parent_gone_raises_report_refused_not_a_grpc_error(make_session, serve):
    s = serve(make_session())
    s.server.stop(grace=0)
    with pytest.raises(SandboxError) as info:
        s.ctx.save_results([{"a": 1}])
    assert type(info.value) is ReportRefused
    assert not isinstance(info.value, grpc.RpcError)
    assert info.value.code == "UNAVAILABLE"


class StillClock:
    """The limiter's clock (its ``time``), standing still until the test moves it."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


def test_ctx_over_the_rate_cap_is_slowed_not_failed(make_session, serve, monkeypatch):
    # The burst pays for one full call of rows, so the second must wait for the
    # budget to refill. The limiter's time moves only once the sandbox has been
    # refused: on real time, a busy machine's gap between the calls (over 0.4 s)
    # refilled it first, and the cap was never reached.
    clock = StillClock()
    monkeypatch.setattr(limits_module, "time", clock)
    s = serve(make_session(), rate_per_s=200.0, burst=1 + MAX_ROWS_PER_CALL // ROWS_PER_TOKEN + 20)

    def refill_once_refused() -> None:
        if wait_for(lambda: s.client.rate_limited > 0):
            clock.now += 1.0

    mover = threading.Thread(target=refill_once_refused, name="clock", daemon=True)
    mover.start()
    try:
        s.ctx.save_results({"i": i} for i in range(2 * MAX_ROWS_PER_CALL))
    finally:
        mover.join(10.0)
    assert len(s.kit.saved()) == 2 * MAX_ROWS_PER_CALL
    assert s.client.rate_limited > 0, "the cap was never reached: this test shows nothing"
    assert not s.session.finished.is_set(), "refused for rate, never ended for abuse"


# -- the real runtime: a protocol's rows and its logging ---------------------------------------


def _run_runtime(session: TaskSession, scratch: Path, stderr_path: Path) -> int:
    """Run the real runtime in a subprocess against a server for ``session``; its exit status."""
    sock_dir = Path(tempfile.mkdtemp(prefix="se-rows-", dir="/tmp"))
    server = None
    try:
        token = secrets.token_urlsafe(32)
        (sock_dir / "token").write_text(token)
        server = TaskServer(session, token, sock_dir / "sandbox.sock")
        server.start()
        args = ["--socket", str(sock_dir / "sandbox.sock"), "--token-file", str(sock_dir / "token")]
        with stderr_path.open("wb") as stderr:
            done = subprocess.run(
                [sys.executable, "-c", RUNTIME, str(scratch), *args],
                cwd=REPO,
                stderr=stderr,
                stdout=subprocess.DEVNULL,
                timeout=45,
                check=False,
            )
        return done.returncode
    finally:
        if server is not None:
            server.stop(grace=0.2)
        shutil.rmtree(sock_dir, ignore_errors=True)


PROTOCOL_ROWS_AND_LOGS = """\
import logging

log = logging.getLogger("proto.stats")
log.info("imported")


def run(ctx):
    log.debug("not shown at INFO")
    ctx.save_results([{"file": "a.csv", "n": 2}, {"file": "b.csv", "n": 5}])
    logging.info("saved %d rows", 2)
    return "done"
"""


def test_a_protocols_rows_and_log_lines_reach_the_parent(make_session, make_protocol, tmp_path):
    bundle = make_protocol(PROTOCOL_ROWS_AND_LOGS)
    kit = make_session(config=runtime_config("task-1", bundle))
    session = kit.session
    assert _run_runtime(session, tmp_path / "scratch", tmp_path / "stderr") == 0
    assert session.finish is not None, (tmp_path / "stderr").read_text()
    assert session.finish.result == "done", session.finish
    assert kit.saved() == [{"file": "a.csv", "n": 2}, {"file": "b.csv", "n": 5}]
    lines = (tmp_path / "stderr").read_text().splitlines()
    # Logged at import too: logging is set up before protocol code is loaded.
    assert lines == ["INFO proto.stats: imported", "INFO root: saved 2 rows"], lines


PROTOCOL_OWN_LOGGING = """\
import logging

logging.basicConfig(level=logging.DEBUG, format="MINE %(levelname)s %(message)s")


def run(ctx):
    logging.getLogger("proto").debug("detail")
    logging.getLogger("proto").warning("careful")
    return "done"
"""


def test_a_protocol_that_configures_logging_gets_exactly_its_own(make_session, make_protocol, tmp_path):
    bundle = make_protocol(PROTOCOL_OWN_LOGGING)
    kit = make_session(config=runtime_config("task-1", bundle))
    session = kit.session
    assert _run_runtime(session, tmp_path / "scratch", tmp_path / "stderr") == 0
    assert session.finish is not None, (tmp_path / "stderr").read_text()
    assert session.finish.result == "done", session.finish
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert lines == ["MINE DEBUG detail", "MINE WARNING careful"], lines


PROTOCOL_OWN_HANDLER = """\
import logging
import sys

log = logging.getLogger("proto")
handler = logging.StreamHandler(sys.stderr)
handler.setFormatter(logging.Formatter("OWN %(name)s %(message)s"))
log.addHandler(handler)


def run(ctx):
    log.info("once")
    logging.getLogger("other").info("by the sandbox's handler")
    return "done"
"""


def test_a_protocols_own_handler_is_not_doubled_by_the_sandboxs(make_session, make_protocol, tmp_path):
    bundle = make_protocol(PROTOCOL_OWN_HANDLER)
    kit = make_session(config=runtime_config("task-1", bundle))
    session = kit.session
    assert _run_runtime(session, tmp_path / "scratch", tmp_path / "stderr") == 0
    assert session.finish is not None, (tmp_path / "stderr").read_text()
    assert session.finish.result == "done", session.finish
    lines = (tmp_path / "stderr").read_text().splitlines()
    assert lines == ["OWN proto once", "INFO other: by the sandbox's handler"], lines


def test_the_protocol_authors_docs_state_the_caps_in_force():
    doc = Context.save_results.__doc__ or ""
    mib = 1024 * 1024
    facts = [
        f"1 to {MAX_COLUMNS} columns",
        f"names of 1 to {MAX_COLUMN_NAME_CHARS} characters",
        f"at most {MAX_ROW_BYTES // 1024} KiB of JSON per row",
        f"calls of up to {MAX_ROWS_PER_CALL} rows (and {MAX_ROWS_BYTES_PER_CALL // mib} MiB)",
        f"{resultrows.MAX_ROWS_PER_BATCH:,} rows",
        f"and {resultrows.MAX_ROWS_BYTES_PER_BATCH // mib} MiB in all",
    ]
    missing = [fact for fact in facts if fact not in " ".join(doc.split())]
    assert not missing, f"Context.save_results's docstring disagrees with the caps: {missing}"


# -- where the rows go: the task's totals, a store that fails, a batch that ended ---------------


def test_the_tasks_totals_span_its_batches(make_session):
    task = TaskRows(max_rows=1500, max_bytes=10**9)
    first = make_session(task_rows=task).session
    first.save_results(['{"a": 1}'] * 1000)
    second = make_session(task_rows=task)
    second.session.save_results(['{"a": 1}'] * 500)
    message = _rejected("RESOURCE_EXHAUSTED", second.session.save_results, ['{"a": 2}'])
    assert message == "at most 1500 result rows per task, all batches together (1500 saved already)"
    task = TaskRows(max_rows=10**6, max_bytes=20)
    kit = make_session(task_rows=task)
    kit.session.save_results(['{"a": 12345678901}'])  # 18 bytes
    message = _rejected("RESOURCE_EXHAUSTED", kit.session.save_results, ['{"b": 1}'])
    assert message == "at most 20 bytes of result rows per task, all batches together (18 saved already)"
    assert (task.rows, task.bytes) == (1, 18)


def test_rows_the_store_cannot_take_are_refused_as_unavailable_and_not_counted(make_session):
    failures = [ProjectDatabaseError("project database /secret/pod.db is locked (waited 10 s)")]
    kept: list[str] = []

    def store(batch: int, rows: list[str]) -> None:
        if failures:
            raise failures.pop()
        kept.extend(rows)

    task = TaskRows(max_rows=10, max_bytes=10**6, store=store)
    kit = make_session(task_rows=task)
    message = _rejected("UNAVAILABLE", kit.session.save_results, ['{"a": 1}'])
    assert "could not store these rows" in message
    assert "/secret" not in message
    assert (task.rows, kit.rows.rows if kit.rows else None) == (0, 0)
    kit.session.save_results(['{"a": 2}'])  # the next call is stored
    assert kept == ['{"a": 2}']


def test_rows_after_their_batch_was_sealed_are_refused(make_session):
    kit = make_session()
    kit.session.save_results(['{"a": 1}'])
    assert kit.rows is not None
    assert kit.rows.seal() == 1
    assert _rejected("FAILED_PRECONDITION", kit.session.save_results, ['{"a": 2}']) == (
        "the task has already finished"
    )
    assert kit.saved() == [{"a": 1}]


def test_a_call_that_waits_too_long_for_the_tasks_earlier_rows_is_refused(make_session, monkeypatch):
    monkeypatch.setattr(resultrows, "STORE_WAIT_S", 0.05)
    entered, release = threading.Event(), threading.Event()

    def slow(batch: int, rows: list[str]) -> None:
        entered.set()
        release.wait(RPC_TIMEOUT)

    kit = make_session(task_rows=TaskRows(max_rows=10, max_bytes=10**6, store=slow))
    first = threading.Thread(target=kit.session.save_results, args=(['{"a": 1}'],))
    first.start()
    try:
        assert entered.wait(RPC_TIMEOUT)
        message = _rejected("UNAVAILABLE", kit.session.save_results, ['{"a": 2}'])
        assert message == "the parent is still storing this task's earlier rows; none of these was saved"
    finally:
        release.set()
        first.join(RPC_TIMEOUT)
    assert kit.rows is not None
    assert kit.rows.rows == 1
