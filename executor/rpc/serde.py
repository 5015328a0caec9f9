"""Domain <-> protobuf, once per boundary: the task's configuration and every RPC's payload.

The servicer calls these and the session; nothing else on the parent side
reads or builds a sandbox message. Enums become :class:`~executor.outcome.Status`,
:class:`~executor.events.ProgressKind`, :class:`~executor.events.ControlKind` and
:class:`~executor.sandbox.contract.MessageType` here and stay enums until printed; a
report becomes the typed event (or the values) the session takes, through one table.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, TypedDict

from executor.data.fileoutcomes import FileKind
from executor.events import REPORTS, AlgorithmProgress, Control, ProgressKind, Report
from executor.rpc.checks import FINISH_STATUSES, RequestRejected
from executor.sandbox.contract import (
    CHUNK_BYTES,
    ENTRY_MODULE,
    SANDBOX_DATA,
    SANDBOX_PROTOCOL,
    MessageType,
    ReportCase,
)
from executor.v1 import sandbox_pb2 as pb

if TYPE_CHECKING:
    from collections.abc import Callable

    from executor.outcome import Status
    from executor.policy import IsolationPolicy
    from executor.spec import TaskSpec

# The statuses a sandbox may report (the session's list), by their wire value.
_SANDBOX_STATUSES = {pb.Status.Value(status.value): status for status in FINISH_STATUSES}


def task_config(
    spec: TaskSpec, task_id: str, bundle_sha256: str, policy: IsolationPolicy, secrets: dict[str, str]
) -> pb.TaskConfig:
    """The configuration the sandbox fetches: no keys, no host paths, only the secrets granted.

    ``bundle_sha256`` is the digest of the task's protocol bundle (the task room's copy).
    """
    return pb.TaskConfig(
        task_id=task_id,
        project_id=spec.project_id,
        modeller_name=spec.modeller_name,
        pod_identifier=spec.pod_identifier,
        pod_identifiers=list(spec.pod_identifiers),
        datasource_name=spec.datasource_name,
        data_path=SANDBOX_DATA,
        schema_json=json.dumps(spec.schema),
        serialized_protocol=spec.serialized_protocol,
        parameters_json=json.dumps(spec.parameters),
        flags=pb.Flags(
            batched_execution=spec.batched,
            test_run=spec.flags.test_run,
            run_on_new_data_only=spec.flags.run_on_new_data_only,
            force_rerun_failed_files=spec.flags.force_rerun_failed_files,
        ),
        inference_limits=pb.InferenceLimits(
            max_files=spec.inference_limits.max_files, max_batches=spec.inference_limits.max_batches
        ),
        model_urls=dict(spec.model_urls),
        task_hash=spec.task_hash,
        username=spec.username,
        protocol_path=SANDBOX_PROTOCOL,
        entry_module=ENTRY_MODULE,
        bundle_sha256=bundle_sha256,
        heartbeat_interval_ms=int(policy.heartbeat_interval_s * 1000),
        max_message_bytes=policy.max_message_bytes,
        max_result_bytes=policy.max_result_bytes,
        chunk_bytes=CHUNK_BYTES,
        secrets=secrets,
    )


def control_message(control: Control) -> pb.Control:
    """A queued control as the message the heartbeat stream sends."""
    return pb.Control(kind=control.kind.value, reason=control.reason)


def message_type(value: int) -> MessageType | str:
    """The ``MessageType`` of a wire value, or ``"<invalid>"`` (which no check lets through)."""
    name = _enum_name(pb.MessageType, value)
    return MessageType(name) if name in MessageType.__members__ else name


def progress_update(event: pb.ProgressEvent) -> AlgorithmProgress:
    """A progress event as the typed event listeners and hooks get (not yet bound to its task).

    Raises:
        RequestRejected: The kind is not one a protocol may report.
    """
    try:
        kind = ProgressKind(_enum_name(pb.ProgressEvent.Kind, event.kind))
    except ValueError:
        raise RequestRejected("INVALID_ARGUMENT", "unknown progress event kind") from None
    return AlgorithmProgress(
        kind=kind,
        current_epoch=event.current_epoch,
        max_epochs=event.max_epochs,
        current=event.current,
        total=event.total,
        info=event.info,
    )


def file_outcomes(request: pb.FileOutcomes) -> list[tuple[str, FileKind, str]]:
    """(name, kind, reason) per reported file; the session checks names and reasons.

    Raises:
        RequestRejected: A kind is not PROCESSED or FAILED.
    """
    try:
        return [(f.name, FileKind(_enum_name(pb.FileOutcome.Kind, f.kind)), f.reason) for f in request.files]
    except ValueError:
        raise RequestRejected("INVALID_ARGUMENT", "file outcome must be PROCESSED or FAILED") from None


def result_rows(request: pb.ResultRows) -> list[str]:
    """The JSON text of each result row; the session parses and checks them."""
    return list(request.rows_json)


# The one conversion table of the Report call: a case's message to what the
# session takes. A case without an entry is a flat message of scalars whose
# fields are those of its event class (REPORTS), made by :func:`_flat_report`.
_REPORTS: dict[str, Callable[[Any], Any]] = {
    ReportCase.PROGRESS: progress_update,
    ReportCase.FILES: file_outcomes,
    ReportCase.ROWS: result_rows,
}


def report_case(request: pb.ReportRequest) -> tuple[str, int]:
    """The case a Report carries and how many items it holds (each entry of its lists; at least 1).

    Raises:
        RequestRejected: The request carries no case.
    """
    case = request.WhichOneof("report")
    if case is None:
        raise RequestRejected("INVALID_ARGUMENT", "a report must carry one of its kinds")
    message = getattr(request, case)
    items = sum(len(value) for field, value in message.ListFields() if _is_repeated(field))
    return case, max(1, items)


def report(request: pb.ReportRequest) -> tuple[str, Any]:
    """A Report's case, and its message as the session takes it (see :data:`_REPORTS`).

    Raises:
        RequestRejected: No case, a case with no event class, or a value its
            class cannot hold.
    """
    case, _ = report_case(request)
    message = getattr(request, case)
    convert = _REPORTS.get(case)
    return case, (convert(message) if convert is not None else _flat_report(case, message))


def _flat_report(case: str, message: Any) -> Report:
    """The event of a case whose message is flat: each field, by name, becomes the event's."""
    cls = REPORTS.get(case)
    if cls is None:
        raise RequestRejected("INVALID_ARGUMENT", f"reports of kind {case} are not accepted")
    fields = {field.name: getattr(message, field.name) for field in message.DESCRIPTOR.fields}
    try:
        return cls(**fields)
    except (TypeError, ValueError):
        raise RequestRejected("INVALID_ARGUMENT", f"malformed {case} report") from None


def _is_repeated(field: Any) -> bool:
    return bool(field.is_repeated)


class FinishFields(TypedDict):
    """What :meth:`~executor.rpc.session.TaskSession.report_finish` takes."""

    status: Status
    result_json: str
    error_type: str
    error_message: str
    traceback: str
    timings: dict[str, float]


def finish_fields(request: pb.FinishRequest) -> FinishFields:
    """The sandbox's terminal report as plain values.

    Raises:
        RequestRejected: The status is not OK, ABORT or ERROR.
    """
    status = _SANDBOX_STATUSES.get(request.status)
    if status is None:
        raise RequestRejected("INVALID_ARGUMENT", "status must be OK, ABORT or ERROR")
    return FinishFields(
        status=status,
        result_json=request.result_json,
        error_type=request.error.type,
        error_message=request.error.message,
        traceback=request.error.traceback,
        timings=dict(request.timings),
    )


def _enum_name(enum: Any, value: int) -> str:
    """The name of ``value`` in a protobuf enum, or ``"<invalid>"``."""
    try:
        return str(enum.Name(value))
    except ValueError:
        return "<invalid>"
