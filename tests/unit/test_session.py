"""TaskSession: everything the sandbox sends is validated before the parent acts on it."""

from __future__ import annotations

import math
import threading

import pytest

from executor.events import ProgressKind, ProgressUpdate
from executor.mailbox.transport import Envelope
from executor.rpc.session import (
    MAX_PENDING_RECEIVES,
    RequestRejected,
)
from executor.sandbox.contract import MAX_INFO_CHARS, MAX_TRACEBACK_CHARS
from executor.v1 import sandbox_pb2 as pb


def _rejected(code, fn, *args, **kwargs):
    with pytest.raises(RequestRejected) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value.public_message
    return info.value.public_message


def _finish(session, status="OK", result_json="null", error_type="", message="", tb="", timings=None):
    session.report_finish(status, result_json, error_type, message, tb, timings or {})


# -- configuration and liveness --------------------------------------------------


def test_config_is_served_and_first_fetch_recorded(make_session):
    kit = make_session(config=pb.TaskConfig(task_id="abc"))
    assert kit.session.config_fetched_at is None
    assert kit.session.get_config().task_id == "abc"
    first = kit.session.config_fetched_at
    assert first is not None
    kit.session.get_config()
    assert kit.session.config_fetched_at == first


def test_beats_are_recorded(make_session):
    session = make_session().session
    session.record_beat(2, 7, True)
    session.record_beat(3, 9, False)
    stats = session.beat_stats
    assert (stats.beats, stats.progress_events, stats.mailbox_ops, stats.main_thread_moved) == (
        2,
        3,
        9,
        False,
    )
    assert stats.last_beat is not None


# -- sending -------------------------------------------------------------------------


def test_send_reaches_the_modeller(make_session):
    kit = make_session()
    kit.session.send_message("TRAINING_UPDATE", 11, iter([b"hello ", b"world"]))
    got = kit.modeller.receive(kit.task_id, timeout=1)
    assert got is not None
    assert (got.type, got.read()) == ("TRAINING_UPDATE", b"hello world")


@pytest.mark.parametrize(
    "message_type",
    ["ALGORITHM_EXCHANGE", "TRAINING_COMPLETE", "TASK_COMPLETE", "MODELLER_RESPONSE", "SECURE_SHARE"],
)
def test_receive_only_types_cannot_be_sent(make_session, message_type):
    kit = make_session()
    message = _rejected("INVALID_ARGUMENT", kit.session.send_message, message_type, 1, iter([b"x"]))
    assert message_type in message
    assert kit.modeller.receive(kit.task_id, timeout=0) is None


@pytest.mark.parametrize("message_type", ["NOT_A_TYPE", "<invalid>", "MESSAGE_TYPE_UNSPECIFIED", ""])
def test_unknown_types_cannot_be_sent(make_session, message_type):
    kit = make_session()
    _rejected("INVALID_ARGUMENT", kit.session.send_message, message_type, 1, iter([b"x"]))
    assert kit.modeller.receive(kit.task_id, timeout=0) is None


def test_oversize_body_is_refused_before_it_is_read(make_session):
    kit = make_session(max_message_bytes=1000)
    pulled = []

    def chunks():
        pulled.append(1)
        yield b"x" * 1001

    message = _rejected("RESOURCE_EXHAUSTED", kit.session.send_message, "TRAINING_UPDATE", 1001, chunks())
    assert "1000" in message
    assert not pulled
    assert kit.modeller.receive(kit.task_id, timeout=0) is None


def test_body_longer_than_declared_is_refused(make_session):
    kit = make_session(max_message_bytes=1000)
    _rejected("RESOURCE_EXHAUSTED", kit.session.send_message, "TRAINING_UPDATE", 10, iter([b"x" * 10, b"y"]))
    _rejected("RESOURCE_EXHAUSTED", kit.session.send_message, "TRAINING_UPDATE", 10, iter([b"x" * 9]))
    assert kit.modeller.receive(kit.task_id, timeout=0) is None


def test_task_traffic_limit(make_session):
    kit = make_session(max_message_bytes=600, max_task_bytes=1000)
    kit.session.send_message("TRAINING_UPDATE", 600, iter([b"a" * 600]))
    _rejected("RESOURCE_EXHAUSTED", kit.session.send_message, "TRAINING_UPDATE", 500, iter([b"b" * 500]))


# -- receiving ---------------------------------------------------------------------


def test_receive_delivers_what_the_modeller_queued(make_session):
    kit = make_session()
    kit.modeller.send(kit.task_id, "ALGORITHM_EXCHANGE", b"global weights")
    incoming = kit.session.receive_message("ALGORITHM_EXCHANGE", 1.0)
    assert incoming.type == "ALGORITHM_EXCHANGE"
    assert incoming.size == len(b"global weights")
    assert b"".join(incoming.chunks(4)) == b"global weights"


def test_receive_waits_for_its_own_type(make_session):
    kit = make_session()
    kit.modeller.send(kit.task_id, "TASK_COMPLETE", b"done")
    _rejected("DEADLINE_EXCEEDED", kit.session.receive_message, "ALGORITHM_EXCHANGE", 0.05)
    assert b"".join(kit.session.receive_message("TASK_COMPLETE", 1.0).chunks(1024)) == b"done"


def test_receive_timeout(make_session):
    kit = make_session()
    message = _rejected("DEADLINE_EXCEEDED", kit.session.receive_message, "MODELLER_RESPONSE", 0.05)
    assert "MODELLER_RESPONSE" in message


@pytest.mark.parametrize("message_type", ["TRAINING_UPDATE", "TASK_START", "SECURE_SHARE", "<invalid>", "X"])
def test_send_only_or_unknown_types_cannot_be_received(make_session, message_type):
    kit = make_session()
    _rejected("INVALID_ARGUMENT", kit.session.receive_message, message_type, 0.01)


@pytest.mark.parametrize("timeout", [-1.0, 600.5, 10_000.0, math.nan, math.inf])
def test_receive_timeout_is_bounded(make_session, timeout):
    _rejected("INVALID_ARGUMENT", make_session().session.receive_message, "ALGORITHM_EXCHANGE", timeout)


def test_oversize_incoming_body_is_refused(make_session):
    kit = make_session(max_message_bytes=100)
    kit.modeller.send(kit.task_id, "ALGORITHM_EXCHANGE", b"z" * 101)
    _rejected("RESOURCE_EXHAUSTED", kit.session.receive_message, "ALGORITHM_EXCHANGE", 1.0)


def test_forged_incoming_body_is_refused(make_session):
    kit = make_session()
    kit.transport.to_pod(kit.task_id, Envelope("ALGORITHM_EXCHANGE", b"SE1" + b"\0" * 40))
    _rejected("DATA_LOSS", kit.session.receive_message, "ALGORITHM_EXCHANGE", 1.0)


class _GatedChannel:
    """A channel whose receives block until released, counting who is waiting."""

    def __init__(self) -> None:
        self.entered = threading.Semaphore(0)
        self.release = threading.Event()

    def send(self, envelope):
        raise AssertionError("not used")

    def receive(self, message_type, timeout):
        self.entered.release()
        self.release.wait(timeout)
        return None

    def close(self):
        self.release.set()


@pytest.mark.timeout(30)
def test_too_many_concurrent_receives(make_session):
    channel = _GatedChannel()
    session = make_session(channel=channel).session
    codes: list[str] = []

    def wait():
        try:
            session.receive_message("ALGORITHM_EXCHANGE", 10.0)
        except RequestRejected as exc:
            codes.append(exc.code)

    threads = [threading.Thread(target=wait) for _ in range(MAX_PENDING_RECEIVES)]
    for t in threads:
        t.start()
    try:
        for _ in threads:
            assert channel.entered.acquire(timeout=5)
        _rejected("RESOURCE_EXHAUSTED", session.receive_message, "ALGORITHM_EXCHANGE", 1.0)
        _rejected("RESOURCE_EXHAUSTED", session.get_secure_shares, 1.0)
    finally:
        channel.release.set()
        for t in threads:
            t.join(10)
    assert codes == ["DEADLINE_EXCEEDED"] * MAX_PENDING_RECEIVES
    # The slots are free again once the waiters are done.
    _rejected("DEADLINE_EXCEEDED", session.receive_message, "ALGORITHM_EXCHANGE", 0.0)


# -- progress ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(ProgressKind))
def test_progress_kinds_reach_the_listener(make_session, kind):
    kit = make_session()
    update = ProgressUpdate(kind, current_epoch=1, max_epochs=3, current=5, total=10, info="loss 0.3")
    kit.session.report_event(update)
    assert kit.progress == [update]


@pytest.mark.parametrize("kind", ["KIND_UNSPECIFIED", "<invalid>", "step", "DONE", ""])
def test_unknown_progress_kinds_are_refused(make_session, kind):
    kit = make_session()
    _rejected("INVALID_ARGUMENT", kit.session.report_event, ProgressUpdate(kind))
    assert kit.progress == []


def test_progress_info_is_capped(make_session):
    kit = make_session()
    kit.session.report_event(ProgressUpdate(ProgressKind.STEP, info="i" * MAX_INFO_CHARS))
    _rejected(
        "INVALID_ARGUMENT",
        kit.session.report_event,
        ProgressUpdate(ProgressKind.STEP, info="i" * (MAX_INFO_CHARS + 1)),
    )
    assert len(kit.progress) == 1


def test_a_failing_progress_listener_does_not_fail_the_call(make_session, caplog):
    def broken(update):
        raise RuntimeError("display crashed")

    kit = make_session(on_progress=broken)
    kit.session.report_event(ProgressUpdate(ProgressKind.RUN_START))
    kit.session.report_event(ProgressUpdate(ProgressKind.RUN_END))
    assert [u.kind for u in kit.progress] == [ProgressKind.RUN_START, ProgressKind.RUN_END]
    assert "progress listener failed" in caplog.text


# -- finish --------------------------------------------------------------------------


def test_finish_records_the_report_once(make_session):
    kit = make_session()
    _finish(kit.session, "OK", '{"accuracy": 0.93, "rows": [1, 2]}', timings={"run": 1.5, "load": 0.25})
    report = kit.session.finish
    assert report is not None
    assert (report.status, report.result) == ("OK", {"accuracy": 0.93, "rows": [1, 2]})
    assert report.timings == {"run": 1.5, "load": 0.25}
    assert kit.session.finished.is_set()
    assert len(kit.finish_calls) == 1
    _rejected("FAILED_PRECONDITION", _finish, kit.session, "ERROR", "null", "Oops", "second report")
    assert kit.session.finish is report
    assert len(kit.finish_calls) == 1


def test_error_report_keeps_its_detail(make_session):
    kit = make_session()
    _finish(kit.session, "ERROR", "", "ValueError", "bad column", "Traceback ...")
    report = kit.session.finish
    assert (report.status, report.result, report.error_type, report.error_message, report.traceback) == (
        "ERROR",
        None,
        "ValueError",
        "bad column",
        "Traceback ...",
    )


@pytest.mark.parametrize("result_json", ["{not json", "[1, 2", "'single'", "{'a': 1}", "[" * 100_000])
def test_invalid_result_json_is_refused(make_session, result_json):
    kit = make_session(max_result_bytes=1024 * 1024)
    _rejected("INVALID_ARGUMENT", _finish, kit.session, "OK", result_json)
    assert kit.session.finish is None
    assert not kit.session.finished.is_set()
    # A corrected report is still accepted.
    _finish(kit.session, "OK", "1")
    assert kit.session.finish.result == 1


@pytest.mark.parametrize("result_json", ["NaN", "Infinity", '{"loss": -Infinity}', "1e400"])
def test_non_standard_json_numbers_are_refused(make_session, result_json):
    _rejected("INVALID_ARGUMENT", _finish, make_session().session, "OK", result_json)


def test_oversize_result_becomes_an_error_report(make_session):
    kit = make_session(max_result_bytes=100)
    big = '"' + "r" * 200 + '"'
    _finish(kit.session, "OK", big, timings={"run": 2.0})
    report = kit.session.finish
    assert report.status == "ERROR"
    assert report.error_type == "ResultTooLarge"
    assert "202 bytes" in report.error_message
    assert "100" in report.error_message
    assert report.result is None
    assert report.timings == {"run": 2.0}
    assert kit.session.finished.is_set()


def test_result_at_the_limit_is_accepted(make_session):
    kit = make_session(max_result_bytes=100)
    exact = '"' + "r" * 98 + '"'
    _finish(kit.session, "OK", exact)
    assert kit.session.finish.status == "OK"
    assert kit.session.finish.result == "r" * 98


def test_result_size_counts_bytes_not_characters(make_session):
    kit = make_session(max_result_bytes=100)
    _finish(kit.session, "OK", '"' + "é" * 60 + '"')  # 62 characters, 122 bytes
    assert kit.session.finish.error_type == "ResultTooLarge"


@pytest.mark.parametrize("status", ["STATUS_UNSPECIFIED", "<invalid>", "TIMEOUT", "ok", ""])
def test_unknown_status_is_refused(make_session, status):
    kit = make_session()
    _rejected("INVALID_ARGUMENT", _finish, kit.session, status, "null")
    assert kit.session.finish is None


@pytest.mark.parametrize(
    "timings",
    [
        {"boot": 1.0},
        {"run": 1.0, "total": 2.0},
        {"run": math.nan},
        {"run": math.inf},
        {"run": -0.5},
        {"load": 1e8},
    ],
    ids=["unknown-name", "extra-name", "nan", "inf", "negative", "absurd"],
)
def test_bad_timings_are_refused(make_session, timings):
    kit = make_session()
    _rejected("INVALID_ARGUMENT", _finish, kit.session, "OK", "null", timings=timings)
    assert kit.session.finish is None


def test_known_timings_are_accepted(make_session):
    kit = make_session()
    timings = {"import": 0.1, "config": 0.0, "load": 0.2, "run": 3.0}
    _finish(kit.session, "OK", "null", timings=timings)
    assert kit.session.finish.timings == timings


def test_error_text_lengths_are_capped(make_session):
    kit = make_session()
    _rejected("INVALID_ARGUMENT", _finish, kit.session, "ERROR", "", "E" * 201, "m")
    _rejected("INVALID_ARGUMENT", _finish, kit.session, "ERROR", "", "E", "m" * 4097)
    _rejected(
        "INVALID_ARGUMENT", _finish, kit.session, "ERROR", "", "E", "m", "t" * (MAX_TRACEBACK_CHARS + 1)
    )
    assert kit.session.finish is None
    _finish(kit.session, "ERROR", "", "E" * 200, "m" * 4096, "t" * MAX_TRACEBACK_CHARS)
    assert kit.session.finish.error_type == "E" * 200


def test_per_task_mailbox_budget_counts_both_ways(tmp_path):
    from executor.mailbox.broker import MailboxBroker, MailboxLimitError
    from executor.mailbox.crypto import TaskKeys
    from executor.mailbox.transport import Route
    from executor.testing import InMemoryTransport, LocalModeller

    transport = InMemoryTransport()
    modeller = LocalModeller(transport)
    keys = TaskKeys.generate()
    modeller.add_task("t", keys)
    route = Route("t")
    broker = MailboxBroker(
        route, transport.open(route), keys, tmp_path / "spool", max_message_bytes=100, max_task_bytes=250
    )
    try:
        broker.send("TRAINING_UPDATE", 100, iter([b"x" * 100]))
        modeller.send("t", "MODELLER_RESPONSE", b"y" * 100)
        assert broker.receive("MODELLER_RESPONSE", 1).body == b"y" * 100
        with pytest.raises(MailboxLimitError, match="limit of 250"):
            broker.send("TRAINING_UPDATE", 51, iter([b"x" * 51]))
        broker.send("TRAINING_UPDATE", 50, iter([b"x" * 50]))
        with pytest.raises(MailboxLimitError, match="the limit is 100"):
            broker.send("TRAINING_UPDATE", 101, iter([b"x" * 101]))
    finally:
        broker.close()
        modeller.close()
        transport.close()


# -- text the parent will print or dump: valid Unicode only ------------------------------


def test_a_result_with_a_lone_surrogate_becomes_an_error_report(make_session):
    kit = make_session()
    _finish(kit.session, "OK", '{"name": "\\ud800 alone"}', timings={"run": 1.0})
    report = kit.session.finish
    assert (report.status, report.result, report.error_type) == ("ERROR", None, "ResultNotSerialisable")
    assert report.timings == {"run": 1.0}


@pytest.mark.parametrize("result_json", ['{"\\udc00": 1}', '["ok", ["\\uDBFF"]]', '"\\ud83d"'])
def test_a_lone_surrogate_anywhere_in_the_result_is_caught(make_session, result_json):
    kit = make_session()
    _finish(kit.session, "OK", result_json)
    assert kit.session.finish.error_type == "ResultNotSerialisable"


def test_a_surrogate_pair_is_an_ordinary_character(make_session):
    kit = make_session()
    _finish(kit.session, "OK", '{"face": "\\ud83d\\ude00", "path": "C:\\\\ud800"}')
    assert kit.session.finish.status == "OK"
    assert kit.session.finish.result == {"face": "\U0001f600", "path": "C:\\ud800"}


@pytest.mark.parametrize("field", ["error_type", "message", "tb"])
def test_error_text_with_a_lone_surrogate_is_refused(make_session, field):
    kit = make_session()
    _rejected("INVALID_ARGUMENT", _finish, kit.session, "ERROR", "", **{field: "bad \udfff text"})
    assert kit.session.finish is None


def test_progress_info_with_a_lone_surrogate_is_refused(make_session):
    kit = make_session()
    _rejected("INVALID_ARGUMENT", kit.session.report_event, ProgressUpdate(ProgressKind.STEP, info="\ud800"))
    assert kit.progress == []


@pytest.mark.parametrize(("name", "reason"), [("a\ud800.csv", "bad"), ("a.csv", "bad \ud800")])
def test_file_outcomes_with_a_lone_surrogate_are_refused(make_session, name, reason):
    kit = make_session()
    _rejected("INVALID_ARGUMENT", kit.session.report_files, [(name, "FAILED", reason)])
    assert kit.session.file_outcomes() == {}


# -- per-file outcomes: bounded in the parent, counts exact ------------------------------


def test_file_outcome_caps_are_pinned():
    """Changing a cap changes what a task may make the parent hold: do it here, on purpose."""
    from executor.data import fileoutcomes as f

    assert f.MAX_FILES_PER_CALL == 1000
    assert f.MAX_FILE_NAME_CHARS == 1024
    assert f.MAX_FILE_REASON_CHARS == 1000
    assert f.MAX_FILES_PER_TASK == 100_000
    assert f.MAX_FILE_NAME_CHARS_PER_TASK == 16 * 1024 * 1024
    assert f.MAX_REASON_CHARS_PER_TASK == 256 * 1024
    assert f.MAX_FAILED_FILES_IN_JSON == 1000
    # The session's checks enforce the same objects, not copies.
    import executor.rpc.checks as s

    assert (s.MAX_FILES_PER_CALL, s.MAX_FILE_NAME_CHARS, s.MAX_FILE_REASON_CHARS) == (
        f.MAX_FILES_PER_CALL,
        f.MAX_FILE_NAME_CHARS,
        f.MAX_FILE_REASON_CHARS,
    )


def test_normal_file_reports_are_kept_as_reported(make_session):
    from executor.outcome import Outcome, Status

    kit = make_session()
    kit.session.report_files([("a.csv", "PROCESSED", ""), ("b.csv", "FAILED", "bad header")])
    kit.session.report_files([("c/d.csv", "FAILED", "empty"), ("a.csv", "FAILED", "re-read: truncated")])
    files = kit.session.file_outcomes()
    assert files == {
        "a.csv": ("FAILED", "re-read: truncated"),
        "b.csv": ("FAILED", "bad header"),
        "c/d.csv": ("FAILED", "empty"),
    }
    doc = Outcome("t", Status.OK, files=files).to_dict()
    assert doc["files"] == {
        "processed": 0,
        "failed": {"a.csv": "re-read: truncated", "b.csv": "bad header", "c/d.csv": "empty"},
    }


def test_a_flood_of_failed_files_is_bounded(make_session):
    """The red-team flood: every file failed, every reason at the per-reason cap."""
    import json
    import tracemalloc

    from executor.data.fileoutcomes import (
        MAX_FAILED_FILES_IN_JSON,
        MAX_FILE_REASON_CHARS,
        MAX_FILES_PER_CALL,
        MAX_FILES_PER_TASK,
        MAX_REASON_CHARS_PER_TASK,
        REASON_DROPPED,
    )
    from executor.outcome import Outcome, Status

    kit = make_session()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for start in range(0, MAX_FILES_PER_TASK, MAX_FILES_PER_CALL):
            kit.session.report_files(
                [
                    (f"f{n:06d}.csv", "FAILED", f"{n:06d}".ljust(MAX_FILE_REASON_CHARS, "x"))
                    for n in range(start, start + MAX_FILES_PER_CALL)
                ]
            )
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # The reasons held stay within their budget; names and entries cost a few
    # hundred bytes each (the flood without the budget held over 100 MB here).
    assert held < MAX_REASON_CHARS_PER_TASK + MAX_FILES_PER_TASK * 400
    files = kit.session.file_outcomes()
    assert len(files) == MAX_FILES_PER_TASK
    kept = [reason for _, reason in files.values() if reason != REASON_DROPPED]
    assert sum(map(len, kept)) <= MAX_REASON_CHARS_PER_TASK
    assert len(kept) == MAX_REASON_CHARS_PER_TASK // MAX_FILE_REASON_CHARS
    # One more distinct file is refused; the ones already counted may be re-reported.
    _rejected("RESOURCE_EXHAUSTED", kit.session.report_files, [("another.csv", "FAILED", "x")])
    kit.session.report_files([("f000000.csv", "PROCESSED", "")])

    doc = Outcome("t", Status.OK, files=kit.session.file_outcomes()).to_dict()["files"]
    assert doc["processed"] == 1
    assert doc["failed_total"] == MAX_FILES_PER_TASK - 1
    assert len(doc["failed"]) == MAX_FAILED_FILES_IN_JSON
    assert doc["failed_truncated"] == MAX_FILES_PER_TASK - 1 - MAX_FAILED_FILES_IN_JSON
    assert len(json.dumps(doc)) < MAX_FAILED_FILES_IN_JSON * (20 + MAX_FILE_REASON_CHARS) + 200


def test_re_reporting_a_file_frees_its_old_reason(make_session):
    from executor.data.fileoutcomes import MAX_FILE_REASON_CHARS, MAX_REASON_CHARS_PER_TASK, REASON_DROPPED

    kit = make_session()
    full = MAX_REASON_CHARS_PER_TASK // MAX_FILE_REASON_CHARS
    for n in range(full):
        kit.session.report_files([(f"f{n}.csv", "FAILED", "r" * MAX_FILE_REASON_CHARS)])
    kit.session.report_files([("late.csv", "FAILED", "r" * MAX_FILE_REASON_CHARS)])
    assert kit.session.file_outcomes()["late.csv"] == ("FAILED", REASON_DROPPED)
    # A reason replaced by a shorter one gives its characters back.
    kit.session.report_files([("f0.csv", "PROCESSED", "")])
    kit.session.report_files([("late2.csv", "FAILED", "kept")])
    assert kit.session.file_outcomes()["late2.csv"] == ("FAILED", "kept")


# -- quota refunds, the parent's own notices, mail after the result (issue 8 item 9) ------


def test_refused_sends_give_their_quota_back(make_session):
    kit = make_session(max_message_bytes=1000, max_task_bytes=1000)
    # Each declares the whole quota and is then refused for its body: none moved a byte.
    for _ in range(5):
        _rejected("RESOURCE_EXHAUSTED", kit.session.send_message, "TRAINING_UPDATE", 1000, iter([b"x" * 9]))
        _rejected(
            "RESOURCE_EXHAUSTED", kit.session.send_message, "TRAINING_UPDATE", 1000, iter([b"x" * 1001])
        )
    kit.session.send_message("TRAINING_UPDATE", 1000, iter([b"z" * 1000]))
    got = kit.modeller.receive(kit.task_id, timeout=1)
    assert got is not None
    assert got.read() == b"z" * 1000


def test_the_parents_task_abort_is_sent_when_the_sandbox_spent_its_quota(make_session):
    kit = make_session(max_message_bytes=1000, max_task_bytes=1000)
    kit.session.send_message("TRAINING_UPDATE", 1000, iter([b"z" * 1000]))
    _rejected("RESOURCE_EXHAUSTED", kit.session.send_message, "TASK_ABORT", 10, iter([b"from child"]))
    kit.broker.send_bytes("TASK_ABORT", b'{"reason": "LimitsExceeded"}')
    kinds = [kit.modeller.receive(kit.task_id, timeout=1) for _ in range(2)]
    assert [(m.type, m.read()) for m in kinds if m is not None] == [
        ("TRAINING_UPDATE", b"z" * 1000),
        ("TASK_ABORT", b'{"reason": "LimitsExceeded"}'),
    ]


def test_mail_after_the_result_is_refused(make_session):
    kit = make_session()
    _finish(kit.session)
    message = _rejected("FAILED_PRECONDITION", kit.session.send_message, "TRAINING_UPDATE", 3, iter([b"new"]))
    assert message == "the task has already finished"
    _rejected("FAILED_PRECONDITION", kit.session.send_secure_shares, {"pod-b": b"share"})
    assert kit.modeller.receive(kit.task_id, timeout=0.2) is None


def test_a_body_still_arriving_when_the_result_comes_is_not_sent(make_session):
    kit = make_session()

    def chunks():
        yield b"first half "
        _finish(kit.session)  # the protocol's result overtakes its own message
        yield b"second half"

    _rejected("FAILED_PRECONDITION", kit.session.send_message, "TRAINING_UPDATE", 22, chunks())
    assert kit.modeller.receive(kit.task_id, timeout=0.2) is None


def test_the_parent_can_end_a_task_for_abuse_once(make_session):
    kit = make_session()
    assert kit.session.end_for_abuse("RpcAbuse", "kept calling") is True
    assert kit.session.finished.is_set()
    assert (kit.session.finish.status, kit.session.finish.error_type) == ("ERROR", "RpcAbuse")
    assert kit.finish_calls == [None]
    # The sandbox's own result comes too late, and so does a second verdict.
    _rejected("FAILED_PRECONDITION", _finish, kit.session)
    assert kit.session.end_for_abuse("RpcAbuse", "again") is False
    assert kit.session.finish.error_message == "kept calling"
