"""One conversion point per boundary: protobuf in and out of the parent's typed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from executor.backends import Mount
from executor.events import ProgressKind
from executor.mailbox.crypto import TaskKeys
from executor.outcome import Status
from executor.policy import IsolationPolicy
from executor.rpc import serde
from executor.rpc.session import RequestRejected
from executor.sandbox.contract import CHUNK_BYTES
from executor.spec import InferenceLimits, TaskFlags, TaskSpec
from executor.task.bundle import Bundle
from executor.task.launch import SANDBOX_DATA, SANDBOX_PROTOCOL, container_spec
from executor.v1 import sandbox_pb2 as pb


def test_the_task_config_carries_sandbox_paths_and_no_keys(tmp_path):
    spec = TaskSpec(
        protocol_dir=tmp_path / "proto",
        data_dir=tmp_path / "data",
        project_id="p",
        parameters={"a": 1},
        flags=TaskFlags(test_run=True, force_rerun_failed_files=True),
        inference_limits=InferenceLimits(max_files=7, max_batches=3),
        keys=TaskKeys.generate(),
    )
    bundle = Bundle(path=tmp_path / "bundle", sha256="ab" * 32, size=1, files=1)
    config = serde.task_config(spec, "t-1", bundle.sha256, IsolationPolicy.hardened(), {"s": "v"})
    assert (config.task_id, config.project_id, config.parameters_json) == ("t-1", "p", '{"a": 1}')
    assert (config.data_path, config.protocol_path) == (SANDBOX_DATA, SANDBOX_PROTOCOL)
    assert config.flags == pb.Flags(test_run=True, force_rerun_failed_files=True)
    assert config.inference_limits == pb.InferenceLimits(max_files=7, max_batches=3)
    assert config.chunk_bytes == CHUNK_BYTES
    assert dict(config.secrets) == {"s": "v"}
    assert str(tmp_path) not in str(config)


def test_progress_and_finish_become_enums_and_bad_values_are_refused():
    update = serde.progress_update(pb.ProgressEvent(kind=pb.ProgressEvent.STEP, current=2, info="x"))
    assert update.kind is ProgressKind.STEP
    assert update.current == 2
    for kind in (0, 77):
        with pytest.raises(RequestRejected, match="unknown progress event kind"):
            serde.progress_update(pb.ProgressEvent(kind=kind))  # type: ignore[arg-type]
    fields = serde.finish_fields(pb.FinishRequest(status=pb.Status.ABORT, error=pb.ErrorInfo(type="T")))
    assert fields["status"] is Status.ABORT
    assert fields["error_type"] == "T"
    with pytest.raises(RequestRejected, match="status must be OK, ABORT or ERROR"):
        serde.finish_fields(pb.FinishRequest(status=pb.Status.STATUS_UNSPECIFIED))
    assert serde.message_type(pb.TASK_START) == "TASK_START"
    assert serde.message_type(999) == "<invalid>"


def test_the_container_sees_only_its_mounts_and_is_labelled(tmp_path):
    class Dir:
        ipc = tmp_path / "ipc"
        resolv_conf = tmp_path / "resolv.conf"

    spec = container_spec(
        task_id="t-1",
        project_id="p",
        instance_id="i",
        policy=IsolationPolicy.hardened(),
        task_dir=Dir(),  # type: ignore[arg-type]
        bundle_path=tmp_path / "bundle",
        data_mounts=[Mount(Path("/srv/data"), SANDBOX_DATA)],
    )
    assert [m.target for m in spec.mounts] == [
        "/run/sandbox",
        SANDBOX_PROTOCOL,
        SANDBOX_DATA,
        "/etc/resolv.conf",
    ]
    assert all(m.read_only for m in spec.mounts)
    assert spec.labels["io.sandbox-executor.task-id"] == "t-1"
    # Init first, with no task-writable directory on its path and no site-packages.
    assert spec.command[:5] == ["python3", "-P", "-S", "-m", "executor.sandbox.init"]


def test_file_outcome_kinds_become_the_enum_and_unknown_kinds_are_refused():
    from executor.data.fileoutcomes import FileKind
    from executor.rpc.serde import file_outcomes
    from executor.rpc.session import RequestRejected

    request = pb.FileOutcomes(
        files=[
            pb.FileOutcome(name="a.csv", kind=pb.FileOutcome.PROCESSED),
            pb.FileOutcome(name="b.csv", kind=pb.FileOutcome.FAILED, reason="bad row"),
        ]
    )
    converted = file_outcomes(request)
    assert converted == [("a.csv", FileKind.PROCESSED, ""), ("b.csv", FileKind.FAILED, "bad row")]
    assert all(type(kind) is FileKind for _, kind, _ in converted)
    with pytest.raises(RequestRejected, match="PROCESSED or FAILED"):
        file_outcomes(pb.FileOutcomes(files=[pb.FileOutcome(name="c.csv", kind=999)]))  # type: ignore[arg-type]
