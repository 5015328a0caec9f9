"""The CLI runs tasks with no modeller: it says what it discarded and closes what it opened."""

from __future__ import annotations

import json

import pytest

import executor.mailbox.transport
import executor.runner
from executor.cli import commands as cli
from executor.mailbox.transport import Envelope, NoModellerTransport, Route
from executor.outcome import Outcome, Status


class RecordingTransport(NoModellerTransport):
    closed = 0

    def close(self) -> None:
        type(self).closed += 1
        super().close()


class MailingExecutor:
    """Stands in for the executor: its task sends two messages, or the run is interrupted."""

    interrupt = False
    closed = 0

    def __init__(self, *args, transport=None, **kwargs):
        assert isinstance(transport, NoModellerTransport)
        self.transport = transport

    def run(self, spec, *, on_progress=None, cancel=None):
        channel = self.transport.open(Route("t-mail"))
        channel.send(Envelope("TASK_START", b"sealed"))
        channel.send(Envelope("TRAINING_UPDATE", b"sealed update"))
        if type(self).interrupt:
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting
        return Outcome("t-mail", Status.OK, {"ok": True}, "runc", {})

    def close(self):
        type(self).closed += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@pytest.fixture
def mailing(monkeypatch, make_protocol, tmp_path):
    MailingExecutor.interrupt = False
    MailingExecutor.closed = 0
    RecordingTransport.closed = 0
    monkeypatch.setattr(executor.runner, "Executor", MailingExecutor)
    monkeypatch.setattr(executor.mailbox.transport, "NoModellerTransport", RecordingTransport)
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    return ["run", str(make_protocol()), "--data", str(data)]


def test_json_counts_the_discarded_messages(capsys, mailing):
    assert cli.main([*mailing, "--json"]) == cli.EXIT_OK
    out, err = capsys.readouterr()
    assert json.loads(out)["discarded_messages"] == 2
    assert err == ""
    assert (MailingExecutor.closed, RecordingTransport.closed) == (1, 1)


def test_human_output_notes_the_discarded_messages_once(capsys, mailing):
    assert cli.main(mailing) == cli.EXIT_OK
    _, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if line.startswith("note: no modeller is attached")]
    assert len(notes) == 1, err


def test_an_interrupted_run_still_closes_the_executor_and_transport(mailing, capsys):
    MailingExecutor.interrupt = True
    assert cli.main([*mailing, "--json"]) == cli.EXIT_INTERRUPTED
    assert (MailingExecutor.closed, RecordingTransport.closed) == (1, 1)
    captured = capsys.readouterr()
    assert captured.out == ""  # no outcome: the task was not waited for
    assert captured.err.count("\n") == 1
    assert "interrupted" in captured.err
