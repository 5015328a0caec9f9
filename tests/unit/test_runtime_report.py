"""The child runtime reports a protocol's failure whatever the exception holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from executor.sandbox import runtime
from executor.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from pathlib import Path


def _finish(tmp_path: Path, body: str) -> pb.FinishRequest:
    (tmp_path / "protocol.py").write_text(body)
    config = pb.TaskConfig(protocol_path=str(tmp_path), entry_module="protocol", max_result_bytes=1 << 20)
    report = runtime._execute(config, object(), {})
    # What the parent receives must survive the wire.
    return pb.FinishRequest.FromString(report.SerializeToString())


@pytest.fixture(autouse=True)
def _forget_protocol_module():
    import sys

    yield
    sys.modules.pop("protocol", None)


def test_an_error_message_with_a_lone_surrogate_is_reported(tmp_path):
    report = _finish(tmp_path, "def run(ctx):\n    raise ValueError('bad \\ud800 text')\n")
    assert report.status == pb.Status.ERROR
    assert report.error.type == "ValueError"
    assert report.error.message == "bad ? text"
    assert "ValueError" in report.error.traceback


def test_an_abort_reason_with_a_lone_surrogate_is_reported(tmp_path):
    body = (
        "from executor.sandbox.context import TaskAborted\n"
        "def run(ctx):\n    raise TaskAborted('stop \\udfff', reason='R\\ud800')\n"
    )
    report = _finish(tmp_path, body)
    assert report.status == pb.Status.ABORT
    assert (report.error.type, report.error.message) == ("R?", "stop ?")


def test_an_exception_whose_str_raises_is_still_reported(tmp_path):
    body = (
        "class Nasty(Exception):\n"
        "    def __str__(self):\n        raise RuntimeError('no')\n"
        "def run(ctx):\n    raise Nasty()\n"
    )
    report = _finish(tmp_path, body)
    assert report.status == pb.Status.ERROR
    assert report.error.type == "Nasty"
    assert "could not be read" in report.error.message


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_protocol_ending_on_a_write_past_the_file_size_limit_is_named_for_it(tmp_path, wrapped):
    body = (
        "import errno\n"
        "def run(ctx):\n"
        "    try:\n"
        "        raise OSError(errno.EFBIG, 'File too large')\n"
        "    except OSError as exc:\n"
        + ("        raise RuntimeError('could not save') from exc\n" if wrapped else "        raise\n")
    )
    report = _finish(tmp_path, body)
    assert report.status == pb.Status.ERROR
    assert report.error.type == "FileSizeExceeded"
    assert "File too large" in report.error.message or "could not save" in report.error.message


def test_other_os_errors_keep_their_own_type(tmp_path):
    report = _finish(tmp_path, "def run(ctx):\n    raise OSError(28, 'No space left on device')\n")
    assert report.error.type == "OSError"
