"""The operator's CLI: bad input is a one-line error and exit 2, before Docker is touched."""

from __future__ import annotations

import json
import tempfile

import docker
import pytest

import executor.executor
from executor import cli
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
    monkeypatch.setattr(executor.executor, "Executor", FakeExecutor)
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
