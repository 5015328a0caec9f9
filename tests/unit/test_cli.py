"""The operator's CLI: bad input is a one-line error and exit 2, before Docker is touched."""

from __future__ import annotations

import json
import tempfile

import docker
import pytest

import executor.runner
from executor.cli import commands as cli
from executor.outcome import ErrorDetail, Outcome, Status


class DockerTouched(Exception):
    """Raised if a test that must not need Docker reaches the engine."""


@pytest.fixture(autouse=True)
def no_docker(monkeypatch):
    """Any attempt to reach a Docker engine fails the test loudly."""

    def refuse(*args, **kwargs):
        raise DockerTouched("the CLI reached for Docker before validating its input")

    monkeypatch.setattr(docker, "from_env", refuse)
    monkeypatch.setattr(docker, "DockerClient", refuse)
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")


@pytest.fixture
def system_tmp(tmp_path, monkeypatch):
    """A private stand-in for the system temporary directory, to see what is left there."""
    path = tmp_path / "system-tmp"
    path.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(path))
    return path


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    (path / "records.csv").write_text("id,value\n1,10\n")
    path.chmod(0o755)
    return path


def _usage_error(capsys, argv):
    status = cli.main(argv)
    out, err = capsys.readouterr()
    assert status == cli.EXIT_USAGE == 2
    assert out == ""
    # Exactly one message line (blank lines are the subject of a separate test).
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("sandbox-executor: error: ")
    return lines[0]


def test_missing_protocol_dir(capsys, tmp_path, data_dir, system_tmp):
    missing = tmp_path / "no-such-protocol"
    err = _usage_error(capsys, ["run", str(missing), "--data", str(data_dir)])
    assert f"protocol directory {missing} does not exist" in err


def test_protocol_dir_without_protocol_py(capsys, tmp_path, data_dir, system_tmp):
    proto = tmp_path / "proto"
    proto.mkdir()
    (proto / "main.py").write_text("def run(ctx):\n    return 1\n")
    err = _usage_error(capsys, ["run", str(proto), "--data", str(data_dir)])
    assert "has no protocol.py" in err


def test_protocol_without_run(capsys, make_protocol, data_dir, system_tmp):
    proto = make_protocol("def train(ctx):\n    return 1\n")
    err = _usage_error(capsys, ["run", str(proto), "--data", str(data_dir), "--json"])
    assert "defines no top-level run(ctx)" in err


def test_protocol_that_does_not_parse(capsys, make_protocol, data_dir, system_tmp):
    proto = make_protocol("def run(ctx:\n")
    err = _usage_error(capsys, ["run", str(proto), "--data", str(data_dir)])
    assert "does not parse" in err


def test_missing_data_dir(capsys, make_protocol, tmp_path, system_tmp):
    missing = tmp_path / "no-such-data"
    err = _usage_error(capsys, ["run", str(make_protocol()), "--data", str(missing)])
    assert f"data directory {missing} does not exist" in err


def test_data_dir_closed_to_the_sandbox_user(capsys, make_protocol, tmp_path, system_tmp):
    closed = tmp_path / "closed"
    closed.mkdir()
    closed.chmod(0o700)
    err = _usage_error(capsys, ["run", str(make_protocol()), "--data", str(closed)])
    assert "not readable by the sandbox user" in err


def test_bad_task_id(capsys, make_protocol, data_dir, system_tmp):
    err = _usage_error(capsys, ["run", str(make_protocol()), "--data", str(data_dir), "--task-id", "../x"])
    assert "task_id" in err


def test_json_mode_error_is_exactly_one_line(capsys, tmp_path, data_dir, system_tmp):
    cli.main(["run", str(tmp_path / "missing"), "--data", str(data_dir), "--json"])
    _, err = capsys.readouterr()
    assert err.count("\n") == 1
    assert err.startswith("sandbox-executor: error: ")


def test_human_mode_error_is_exactly_one_line(capsys, tmp_path, data_dir, system_tmp):
    cli.main(["run", str(tmp_path / "missing"), "--data", str(data_dir)])
    _, err = capsys.readouterr()
    assert err.count("\n") == 1, repr(err)
    assert err.startswith("sandbox-executor: error: ")


def test_a_refused_run_leaves_nothing_in_the_temp_dir(capsys, tmp_path, data_dir, system_tmp):
    _usage_error(capsys, ["run", str(tmp_path / "missing"), "--data", str(data_dir)])
    assert sorted(p.name for p in system_tmp.iterdir()) == []


def test_a_run_refused_by_the_engine_leaves_nothing_behind(
    capsys, tmp_path, data_dir, system_tmp, monkeypatch
):
    # Refused after the task directory, token, socket, lifeline and spool were
    # made (the engine will not create the container): all of it must go.
    import executor.backends.docker as docker_backend
    from executor.errors import ContainerError
    from executor.testing import FakeBackend

    engine = FakeBackend(create_errors=[ContainerError("container create failed: no space left")])
    monkeypatch.setattr(docker_backend, "DockerBackend", lambda: engine)
    run_dir, spool = tmp_path / "run", tmp_path / "spool"
    monkeypatch.setenv("SANDBOX_EXECUTOR_RUN_DIR", str(run_dir))
    monkeypatch.setenv("SANDBOX_EXECUTOR_SPOOL_DIR", str(spool))
    monkeypatch.setenv("SANDBOX_EXECUTOR_UID_DIR", str(tmp_path / "uids"))
    proto = tmp_path / "proto"
    proto.mkdir()
    (proto / "protocol.py").write_text("def run(ctx):\n    return 1\n")
    err = _usage_error(capsys, ["run", str(proto), "--data", str(data_dir)])
    assert "no space left" in err
    assert [op for op, _ in engine.calls].count("create") == 1  # it got as far as the engine
    assert list(run_dir.iterdir()) == []
    assert not spool.exists() or list(spool.iterdir()) == []
    assert sorted(p.name for p in system_tmp.iterdir()) == []


# -- --param ------------------------------------------------------------------------


def _params(*pairs):
    args = cli.build_parser().parse_args(["run", "proto", "--data", "data", *(f"--param={p}" for p in pairs)])
    return dict(args.param)


def test_param_values_are_json_when_they_parse():
    assert _params("epochs=3", "lr=0.01", 'cols=["age", "bp"]', 'opts={"a": null}', "flag=true") == {
        "epochs": 3,
        "lr": 0.01,
        "cols": ["age", "bp"],
        "opts": {"a": None},
        "flag": True,
    }


def test_param_values_are_strings_otherwise():
    assert _params("name=alice", "path=/data/x.csv", "empty=", "eq=a=b", 'quoted="3"') == {
        "name": "alice",
        "path": "/data/x.csv",
        "empty": "",
        "eq": "a=b",
        "quoted": "3",
    }


def test_later_param_wins():
    assert _params("k=1", "k=2") == {"k": 2}


@pytest.mark.parametrize("bad", ["noequals", "=3", "1st=3", "a b=1", "a/b=1", "x" * 129 + "=1"])
def test_malformed_param_is_a_usage_error(capsys, bad):
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["run", "proto", "--data", "data", "--param", bad])
    assert info.value.code == 2
    _, err = capsys.readouterr()
    assert "KEY=VALUE" in err


def test_param_key_with_trailing_newline_is_a_usage_error():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["run", "proto", "--data", "data", "--param", "k\n=1"])


def test_malformed_param_through_main(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["run", "proto", "--data", "data", "--param", "oops"])
    assert info.value.code == 2


# -- a run, with the engine replaced ------------------------------------------------------


class FakeExecutor:
    """Stands in for the executor: records the task and returns a set outcome."""

    outcome: Outcome
    specs: list[object]
    closed: int = 0

    def __init__(self, *args, **kwargs):
        pass

    def run(self, spec, *, on_progress=None, cancel=None):
        type(self).specs.append(spec)
        return type(self).outcome

    def close(self):
        type(self).closed += 1

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


@pytest.fixture
def fake_executor(monkeypatch):
    FakeExecutor.specs = []
    FakeExecutor.closed = 0
    monkeypatch.setattr(executor.runner, "Executor", FakeExecutor)
    return FakeExecutor


def test_json_output_and_exit_status_for_ok(capsys, fake_executor, make_protocol, data_dir):
    fake_executor.outcome = Outcome("t-1", Status.OK, {"mean": 21.0}, "runc", {"run": 0.5})
    status = cli.main(
        [
            "run",
            str(make_protocol()),
            "--data",
            str(data_dir),
            "--project",
            "proj-a",
            "--param",
            "k=[1,2]",
            "--json",
        ]
    )
    out, _ = capsys.readouterr()
    assert status == 0
    assert json.loads(out) == {
        "task_id": "t-1",
        "status": "OK",
        "result": {"mean": 21.0},
        "runtime": "runc",
        "timings": {"run": 0.5},
        "discarded_messages": 0,
    }
    (spec,) = fake_executor.specs
    assert spec.parameters == {"k": [1, 2]}
    assert spec.project_id == "proj-a"
    assert spec.datasource_name == "data"


def test_json_output_and_exit_status_for_failure(capsys, fake_executor, make_protocol, data_dir):
    fake_executor.outcome = Outcome(
        "t-2", Status.ERROR, runtime="runsc", error=ErrorDetail("ValueError", "bad column")
    )
    status = cli.main(["run", str(make_protocol()), "--data", str(data_dir), "--json"])
    out, _ = capsys.readouterr()
    assert status == 1
    doc = json.loads(out)
    assert doc["status"] == "ERROR"
    assert doc["error"] == {"type": "ValueError", "message": "bad column"}


# -- hostile text from the sandbox never steers the operator's terminal ------------------

# Clear screen, a fake green OK, an OSC 52 clipboard write, 8-bit CSI, a bidi
# override, rich markup (one that crashed the CLI), a carriage return, a lone surrogate.
HOSTILE = [
    "\x1b[2J\x1b[H",
    "\x1b[1;32mOK\x1b[0m",
    "\x1b]52;c;Y3VybCBldmlsLnNoIHwgc2g=\x07",
    "\x9b31m\x9d0;title\x9c",
    "gpj.\u202eexe",
    "[/]",
    "[bold red]x[/]",
    "fake\rOK",
    "del\x7f zero\u200bwidth",
    "lone \ud800 surrogate",
]


def _unsafe(text):
    """Characters that could steer a terminal: controls (except newline), DEL, C1, format, surrogates."""
    import unicodedata

    return [ch for ch in text if ch != "\n" and unicodedata.category(ch) in {"Cc", "Cf", "Cs", "Zl", "Zp"}]


@pytest.mark.parametrize("text", HOSTILE)
def test_printable_leaves_nothing_that_steers_a_terminal(text):
    from executor.cli.terminal import printable

    safe = printable(text)
    assert _unsafe(safe) == []
    assert "\n" not in safe
    safe.encode("utf-8")  # no lone surrogate left
    assert printable(text, multiline=True) == safe  # none of these holds a newline or tab


def test_printable_keeps_ordinary_text_and_shows_what_it_replaced():
    from executor.cli.terminal import printable

    assert printable("loss 0.31 — épreuve 東京 😀 [ok]") == "loss 0.31 — épreuve 東京 😀 [ok]"
    assert printable("a\x1b[2Jb") == "a\\x1b[2Jb"
    assert printable("\x9b\u202e\ud800") == "\\x9b\\u202e\\ud800"
    assert printable("line 1\nline 2\tx") == "line 1\\nline 2\\tx"
    assert printable("line 1\nline 2\tx", multiline=True) == "line 1\nline 2\tx"


def _plain_console():
    """A console whose output holds only what was printed: no colour, no terminal codes."""
    import io

    from rich.console import Console

    return Console(file=io.StringIO(), force_terminal=False, color_system=None, width=200)


def _hostile_outcome(status):
    joined = " ".join(HOSTILE)
    if status is Status.OK:
        return Outcome(
            "t-hostile",
            Status.OK,
            {joined: [joined, {"k": joined}]},
            "runc",
            {"run": 0.5},
            files={"records.csv": ("FAILED", joined), "a.csv": ("PROCESSED", "")},
        )
    return Outcome(
        "t-hostile",
        status,
        runtime="runc",
        error=ErrorDetail(joined, joined, traceback=joined, stderr_tail=joined),
        files={joined.replace("\ud800", "?"): ("FAILED", joined)},
    )


@pytest.mark.parametrize("status", [Status.OK, Status.ERROR])
def test_print_outcome_shows_hostile_text_inert(status):
    from executor.cli.display import print_outcome

    console = _plain_console()
    print_outcome(_hostile_outcome(status), console)
    out = console.file.getvalue()
    assert _unsafe(out) == []
    out.encode("utf-8")
    # Markup is shown, not interpreted.
    assert "[/]" in out
    assert "[bold red]x[/]" in out
    assert out.splitlines()[0].startswith(f"{status.value} task t-hostile")
    assert "files: " in out


def test_progress_display_shows_hostile_info_inert():
    from executor.cli.display import ProgressDisplay
    from executor.events import ProgressKind, ProgressUpdate

    console = _plain_console()
    with ProgressDisplay(console) as display:
        display.update(ProgressUpdate(ProgressKind.RUN_START))
        for n, info in enumerate(HOSTILE, start=1):
            display.update(ProgressUpdate(ProgressKind.STEP, current=n, total=len(HOSTILE), info=info))
        display.update(
            ProgressUpdate(ProgressKind.STEP, current=len(HOSTILE), total=len(HOSTILE), info="[/] last")
        )
        display.update(ProgressUpdate(ProgressKind.RUN_END))
    out = console.file.getvalue()
    assert _unsafe(out) == []
    assert "[/] last" in out


@pytest.mark.parametrize(("status", "code"), [(Status.OK, 0), (Status.ERROR, 1)])
def test_cli_human_output_of_a_hostile_outcome(capsys, fake_executor, make_protocol, data_dir, status, code):
    fake_executor.outcome = _hostile_outcome(status)
    assert cli.main(["run", str(make_protocol()), "--data", str(data_dir)]) == code
    out, err = capsys.readouterr()
    assert _unsafe(out) == []
    assert _unsafe(err) == []
    assert "Traceback" not in err


def test_usage_error_quoting_a_hostile_file_name_is_inert(capsys, tmp_path, data_dir, system_tmp):
    proto = tmp_path / "\x1b[2J\x1b]52;c;eA==\x07\u202eevil"
    line = _usage_error(capsys, ["run", str(proto), "--data", str(data_dir)])
    assert "does not exist" in line
    assert _unsafe(line) == []
