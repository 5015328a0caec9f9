from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MessageType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESSAGE_TYPE_UNSPECIFIED: _ClassVar[MessageType]
    TASK_START: _ClassVar[MessageType]
    PREPARING_DATA_BATCHES: _ClassVar[MessageType]
    TASK_ABORT: _ClassVar[MessageType]
    NUMBER_OF_BATCHES: _ClassVar[MessageType]
    BATCHES_COMPLETE: _ClassVar[MessageType]
    CURRENT_BATCH_ID: _ClassVar[MessageType]
    TRAINING_UPDATE: _ClassVar[MessageType]
    ALGORITHM_EXCHANGE: _ClassVar[MessageType]
    TRAINING_COMPLETE: _ClassVar[MessageType]
    TASK_COMPLETE: _ClassVar[MessageType]
    MODELLER_RESPONSE: _ClassVar[MessageType]
    SECURE_SHARE: _ClassVar[MessageType]

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    OK: _ClassVar[Status]
    ABORT: _ClassVar[Status]
    ERROR: _ClassVar[Status]
MESSAGE_TYPE_UNSPECIFIED: MessageType
TASK_START: MessageType
PREPARING_DATA_BATCHES: MessageType
TASK_ABORT: MessageType
NUMBER_OF_BATCHES: MessageType
BATCHES_COMPLETE: MessageType
CURRENT_BATCH_ID: MessageType
TRAINING_UPDATE: MessageType
ALGORITHM_EXCHANGE: MessageType
TRAINING_COMPLETE: MessageType
TASK_COMPLETE: MessageType
MODELLER_RESPONSE: MessageType
SECURE_SHARE: MessageType
STATUS_UNSPECIFIED: Status
OK: Status
ABORT: Status
ERROR: Status

class GetTaskRequest(_message.Message):
    __slots__ = ("no_wait",)
    NO_WAIT_FIELD_NUMBER: _ClassVar[int]
    no_wait: bool
    def __init__(self, no_wait: _Optional[bool] = ...) -> None: ...

class Flags(_message.Message):
    __slots__ = ("batched_execution", "test_run", "run_on_new_data_only", "force_rerun_failed_files")
    BATCHED_EXECUTION_FIELD_NUMBER: _ClassVar[int]
    TEST_RUN_FIELD_NUMBER: _ClassVar[int]
    RUN_ON_NEW_DATA_ONLY_FIELD_NUMBER: _ClassVar[int]
    FORCE_RERUN_FAILED_FILES_FIELD_NUMBER: _ClassVar[int]
    batched_execution: bool
    test_run: bool
    run_on_new_data_only: bool
    force_rerun_failed_files: bool
    def __init__(self, batched_execution: _Optional[bool] = ..., test_run: _Optional[bool] = ..., run_on_new_data_only: _Optional[bool] = ..., force_rerun_failed_files: _Optional[bool] = ...) -> None: ...

class InferenceLimits(_message.Message):
    __slots__ = ("max_files", "max_batches")
    MAX_FILES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCHES_FIELD_NUMBER: _ClassVar[int]
    max_files: int
    max_batches: int
    def __init__(self, max_files: _Optional[int] = ..., max_batches: _Optional[int] = ...) -> None: ...

class TaskConfig(_message.Message):
    __slots__ = ("task_id", "project_id", "modeller_name", "pod_identifier", "pod_identifiers", "datasource_name", "data_path", "schema_json", "serialized_protocol", "parameters_json", "flags", "inference_limits", "model_urls", "task_hash", "username", "protocol_path", "entry_module", "bundle_sha256", "heartbeat_interval_ms", "max_message_bytes", "max_result_bytes", "chunk_bytes", "secrets")
    class ModelUrlsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class SecretsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PROJECT_ID_FIELD_NUMBER: _ClassVar[int]
    MODELLER_NAME_FIELD_NUMBER: _ClassVar[int]
    POD_IDENTIFIER_FIELD_NUMBER: _ClassVar[int]
    POD_IDENTIFIERS_FIELD_NUMBER: _ClassVar[int]
    DATASOURCE_NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_PATH_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    SERIALIZED_PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_JSON_FIELD_NUMBER: _ClassVar[int]
    FLAGS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_LIMITS_FIELD_NUMBER: _ClassVar[int]
    MODEL_URLS_FIELD_NUMBER: _ClassVar[int]
    TASK_HASH_FIELD_NUMBER: _ClassVar[int]
    USERNAME_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_PATH_FIELD_NUMBER: _ClassVar[int]
    ENTRY_MODULE_FIELD_NUMBER: _ClassVar[int]
    BUNDLE_SHA256_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RESULT_BYTES_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECRETS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    project_id: str
    modeller_name: str
    pod_identifier: str
    pod_identifiers: _containers.RepeatedScalarFieldContainer[str]
    datasource_name: str
    data_path: str
    schema_json: str
    serialized_protocol: bytes
    parameters_json: str
    flags: Flags
    inference_limits: InferenceLimits
    model_urls: _containers.ScalarMap[str, str]
    task_hash: str
    username: str
    protocol_path: str
    entry_module: str
    bundle_sha256: str
    heartbeat_interval_ms: int
    max_message_bytes: int
    max_result_bytes: int
    chunk_bytes: int
    secrets: _containers.ScalarMap[str, str]
    def __init__(self, task_id: _Optional[str] = ..., project_id: _Optional[str] = ..., modeller_name: _Optional[str] = ..., pod_identifier: _Optional[str] = ..., pod_identifiers: _Optional[_Iterable[str]] = ..., datasource_name: _Optional[str] = ..., data_path: _Optional[str] = ..., schema_json: _Optional[str] = ..., serialized_protocol: _Optional[bytes] = ..., parameters_json: _Optional[str] = ..., flags: _Optional[_Union[Flags, _Mapping]] = ..., inference_limits: _Optional[_Union[InferenceLimits, _Mapping]] = ..., model_urls: _Optional[_Mapping[str, str]] = ..., task_hash: _Optional[str] = ..., username: _Optional[str] = ..., protocol_path: _Optional[str] = ..., entry_module: _Optional[str] = ..., bundle_sha256: _Optional[str] = ..., heartbeat_interval_ms: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_result_bytes: _Optional[int] = ..., chunk_bytes: _Optional[int] = ..., secrets: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Beat(_message.Message):
    __slots__ = ("seq", "progress_events", "mailbox_ops", "main_thread_moved")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_EVENTS_FIELD_NUMBER: _ClassVar[int]
    MAILBOX_OPS_FIELD_NUMBER: _ClassVar[int]
    MAIN_THREAD_MOVED_FIELD_NUMBER: _ClassVar[int]
    seq: int
    progress_events: int
    mailbox_ops: int
    main_thread_moved: bool
    def __init__(self, seq: _Optional[int] = ..., progress_events: _Optional[int] = ..., mailbox_ops: _Optional[int] = ..., main_thread_moved: _Optional[bool] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("kind", "reason")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[Control.Kind]
        MODELLER_READY: _ClassVar[Control.Kind]
        CANCEL: _ClassVar[Control.Kind]
        BEAT_SEEN: _ClassVar[Control.Kind]
    KIND_UNSPECIFIED: Control.Kind
    MODELLER_READY: Control.Kind
    CANCEL: Control.Kind
    BEAT_SEEN: Control.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    kind: Control.Kind
    reason: str
    def __init__(self, kind: _Optional[_Union[Control.Kind, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class MessageChunk(_message.Message):
    __slots__ = ("type", "total_size", "data", "bulk_ticket")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    BULK_TICKET_FIELD_NUMBER: _ClassVar[int]
    type: MessageType
    total_size: int
    data: bytes
    bulk_ticket: bytes
    def __init__(self, type: _Optional[_Union[MessageType, str]] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ..., bulk_ticket: _Optional[bytes] = ...) -> None: ...

class SendMessageResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReceiveMessageRequest(_message.Message):
    __slots__ = ("type", "timeout_ms", "bulk_min_bytes")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    BULK_MIN_BYTES_FIELD_NUMBER: _ClassVar[int]
    type: MessageType
    timeout_ms: int
    bulk_min_bytes: int
    def __init__(self, type: _Optional[_Union[MessageType, str]] = ..., timeout_ms: _Optional[int] = ..., bulk_min_bytes: _Optional[int] = ...) -> None: ...

class MailboxOp(_message.Message):
    __slots__ = ("send", "receive")
    SEND_FIELD_NUMBER: _ClassVar[int]
    RECEIVE_FIELD_NUMBER: _ClassVar[int]
    send: MessageChunk
    receive: ReceiveMessageRequest
    def __init__(self, send: _Optional[_Union[MessageChunk, _Mapping]] = ..., receive: _Optional[_Union[ReceiveMessageRequest, _Mapping]] = ...) -> None: ...

class MailboxReply(_message.Message):
    __slots__ = ("error_code", "error_message", "chunk", "more")
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    MORE_FIELD_NUMBER: _ClassVar[int]
    error_code: str
    error_message: str
    chunk: MessageChunk
    more: bool
    def __init__(self, error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., chunk: _Optional[_Union[MessageChunk, _Mapping]] = ..., more: _Optional[bool] = ...) -> None: ...

class BulkSendRequest(_message.Message):
    __slots__ = ("type", "total_size")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    type: MessageType
    total_size: int
    def __init__(self, type: _Optional[_Union[MessageType, str]] = ..., total_size: _Optional[int] = ...) -> None: ...

class BulkTicket(_message.Message):
    __slots__ = ("ticket",)
    TICKET_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    def __init__(self, ticket: _Optional[bytes] = ...) -> None: ...

class SecureShares(_message.Message):
    __slots__ = ("shares",)
    class SharesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    SHARES_FIELD_NUMBER: _ClassVar[int]
    shares: _containers.ScalarMap[str, bytes]
    def __init__(self, shares: _Optional[_Mapping[str, bytes]] = ...) -> None: ...

class GetSecureSharesRequest(_message.Message):
    __slots__ = ("timeout_ms",)
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    timeout_ms: int
    def __init__(self, timeout_ms: _Optional[int] = ...) -> None: ...

class ProgressEvent(_message.Message):
    __slots__ = ("kind", "current_epoch", "max_epochs", "current", "total", "info")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[ProgressEvent.Kind]
        RUN_START: _ClassVar[ProgressEvent.Kind]
        RUN_END: _ClassVar[ProgressEvent.Kind]
        EPOCH_START: _ClassVar[ProgressEvent.Kind]
        EPOCH_END: _ClassVar[ProgressEvent.Kind]
        STEP: _ClassVar[ProgressEvent.Kind]
    KIND_UNSPECIFIED: ProgressEvent.Kind
    RUN_START: ProgressEvent.Kind
    RUN_END: ProgressEvent.Kind
    EPOCH_START: ProgressEvent.Kind
    EPOCH_END: ProgressEvent.Kind
    STEP: ProgressEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    CURRENT_EPOCH_FIELD_NUMBER: _ClassVar[int]
    MAX_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    kind: ProgressEvent.Kind
    current_epoch: int
    max_epochs: int
    current: int
    total: int
    info: str
    def __init__(self, kind: _Optional[_Union[ProgressEvent.Kind, str]] = ..., current_epoch: _Optional[int] = ..., max_epochs: _Optional[int] = ..., current: _Optional[int] = ..., total: _Optional[int] = ..., info: _Optional[str] = ...) -> None: ...

class FileOutcome(_message.Message):
    __slots__ = ("name", "kind", "reason")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[FileOutcome.Kind]
        PROCESSED: _ClassVar[FileOutcome.Kind]
        FAILED: _ClassVar[FileOutcome.Kind]
    KIND_UNSPECIFIED: FileOutcome.Kind
    PROCESSED: FileOutcome.Kind
    FAILED: FileOutcome.Kind
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: FileOutcome.Kind
    reason: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[FileOutcome.Kind, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class FileOutcomes(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[FileOutcome]
    def __init__(self, files: _Optional[_Iterable[_Union[FileOutcome, _Mapping]]] = ...) -> None: ...

class ResultRows(_message.Message):
    __slots__ = ("rows_json",)
    ROWS_JSON_FIELD_NUMBER: _ClassVar[int]
    rows_json: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, rows_json: _Optional[_Iterable[str]] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("progress", "files", "rows", "metric")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    METRIC_FIELD_NUMBER: _ClassVar[int]
    progress: ProgressEvent
    files: FileOutcomes
    rows: ResultRows
    metric: Metric
    def __init__(self, progress: _Optional[_Union[ProgressEvent, _Mapping]] = ..., files: _Optional[_Union[FileOutcomes, _Mapping]] = ..., rows: _Optional[_Union[ResultRows, _Mapping]] = ..., metric: _Optional[_Union[Metric, _Mapping]] = ...) -> None: ...

class Metric(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: float
    def __init__(self, name: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ErrorInfo(_message.Message):
    __slots__ = ("type", "message", "traceback")
    TYPE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRACEBACK_FIELD_NUMBER: _ClassVar[int]
    type: str
    message: str
    traceback: str
    def __init__(self, type: _Optional[str] = ..., message: _Optional[str] = ..., traceback: _Optional[str] = ...) -> None: ...

class FinishRequest(_message.Message):
    __slots__ = ("status", "result_json", "error", "timings")
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STATUS_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    status: Status
    result_json: str
    error: ErrorInfo
    timings: _containers.ScalarMap[str, float]
    def __init__(self, status: _Optional[_Union[Status, str]] = ..., result_json: _Optional[str] = ..., error: _Optional[_Union[ErrorInfo, _Mapping]] = ..., timings: _Optional[_Mapping[str, float]] = ...) -> None: ...
