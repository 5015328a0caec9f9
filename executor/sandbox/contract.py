"""The wire contract: every fact the parent and the sandbox both rely on, in one place.

Standard library only, and shipped into the image with the child runtime, so
both sides import the same numbers: the parent enforces them at its RPC edge,
the child truncates to them before it sends. A fact written on each side
drifts (it did: 16,384 vs 8,000 traceback characters).
"""

from __future__ import annotations

import enum
import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Mapping

# -- version ---------------------------------------------------------------------
# The version of this contract and of the proto. An image carries the version of
# the child runtime it was built with (the label io.sandbox-executor.wire-version,
# which `make images` reads from this line), and the parent refuses an image of
# another version before it starts anything. Raise it with any change a parent
# and a child of different checkouts would disagree on.
WIRE_VERSION = 1

# -- authentication and signals ------------------------------------------------
# Every call carries the task's bootstrap token in this metadata entry.
TOKEN_METADATA_KEY = "x-sandbox-token"  # noqa: S105 (a header name, not a secret)
# Set in the trailing metadata of a RESOURCE_EXHAUSTED refusal that only means
# "too fast": the child backs off and retries such calls, and no others.
RATE_LIMITED_TRAILER = "x-sandbox-rate-limited"
# Trailing metadata on an OpenBulkSend refused only because every bulk ticket is
# out (receives hold them): the body may take the gRPC path instead.
BULK_BUSY_TRAILER = "x-sandbox-bulk-busy"

# -- where the sandbox finds what the parent gives it -----------------------------
# The parent mounts the task's IPC directory, bundle and data view at these
# paths, and the task configuration names them; the runtime imports
# ENTRY_MODULE (its file: ENTRY_MODULE + ".py") from the bundle.
SANDBOX_IPC = "/run/sandbox"
SANDBOX_PROTOCOL = "/sandbox/protocol"
SANDBOX_DATA = "/data"
ENTRY_MODULE = "protocol"

# -- the child's exit statuses (besides its own 0 and 1) ------------------------
# Init could not start the runtime (bad arguments, no lifeline, exec failed).
EXIT_INIT_FAILED = 70
# The parent vanished (seen by init or the runtime): no sandbox outlives its parent.
EXIT_PARENT_GONE = 75

# -- error types the runtime names itself ----------------------------------------
# A protocol that ends on a write refused past the policy's file_size_mb
# (RLIMIT_FSIZE: EFBIG, "File too large") ends ERROR with this type.
FILE_SIZE_EXCEEDED = "FileSizeExceeded"

# -- liveness ------------------------------------------------------------------
# The runtime beats at most this often, whatever the configuration asks; the
# parent's heartbeat budget is sized for it.
MIN_HEARTBEAT_INTERVAL_MS = 50


# -- mailbox -------------------------------------------------------------------
class MessageType(enum.StrEnum):
    """A mailbox message's type: the names of ``executor.v1.MessageType`` (0 is no type)."""

    TASK_START = "TASK_START"
    PREPARING_DATA_BATCHES = "PREPARING_DATA_BATCHES"
    TASK_ABORT = "TASK_ABORT"
    NUMBER_OF_BATCHES = "NUMBER_OF_BATCHES"
    BATCHES_COMPLETE = "BATCHES_COMPLETE"
    CURRENT_BATCH_ID = "CURRENT_BATCH_ID"
    TRAINING_UPDATE = "TRAINING_UPDATE"
    ALGORITHM_EXCHANGE = "ALGORITHM_EXCHANGE"
    TRAINING_COMPLETE = "TRAINING_COMPLETE"
    TASK_COMPLETE = "TASK_COMPLETE"
    MODELLER_RESPONSE = "MODELLER_RESPONSE"
    SECURE_SHARE = "SECURE_SHARE"


# The types a sandbox may send to the modeller, and those it may wait for.
SENDABLE = frozenset(
    {
        MessageType.TASK_START,
        MessageType.PREPARING_DATA_BATCHES,
        MessageType.TASK_ABORT,
        MessageType.NUMBER_OF_BATCHES,
        MessageType.BATCHES_COMPLETE,
        MessageType.CURRENT_BATCH_ID,
        MessageType.TRAINING_UPDATE,
    }
)
RECEIVABLE = frozenset(
    {
        MessageType.ALGORITHM_EXCHANGE,
        MessageType.TRAINING_COMPLETE,
        MessageType.TASK_COMPLETE,
        MessageType.MODELLER_RESPONSE,
    }
)

# The bodies of the seed's batch messages (JSON objects): the parent sends
# them for a batched task, the sandbox for an unbatched one, so the modeller
# reads the same bytes either way.
MAX_BATCH_STATE_CHARS = 200


def number_of_batches_body(number: int) -> bytes:
    """The body of a NUMBER_OF_BATCHES message."""
    return _json_body({"number_of_batches": int(number)})


def batches_complete_body(state: str) -> bytes:
    """The body of a BATCHES_COMPLETE message (``state``: how batching ended)."""
    return _json_body({"state": str(state)[:MAX_BATCH_STATE_CHARS]})


def current_batch_id_body(batch_id: int) -> bytes:
    """The body of a CURRENT_BATCH_ID message."""
    return _json_body({"batch_id": int(batch_id)})


def task_abort_body(message: str, reason: str = "", exception_type: str = "", traceback: str = "") -> bytes:
    """The body of a TASK_ABORT message, each field cut to the contract's caps."""
    return _json_body(
        {
            "message": message[:MAX_ERROR_MESSAGE_CHARS],
            "reason": reason[:MAX_ERROR_TYPE_CHARS],
            "exception_type": exception_type[:MAX_ERROR_TYPE_CHARS],
            "traceback": traceback[-MAX_TRACEBACK_CHARS:],
        }
    )


def _json_body(value: dict[str, object]) -> bytes:
    return json.dumps(value).encode()


# Mailbox bodies of any size travel in chunks of at most this many bytes, so no
# single gRPC message is ever large.
CHUNK_BYTES = 1024 * 1024
# Bodies of at least this size take the bulk path instead (executor/rpc/bulk.py):
# raw bytes over bulk.sock, beside the gRPC socket, after a single-use ticket.
BULK_MIN_BYTES = 2 * CHUNK_BYTES
BULK_SOCKET_NAME = "bulk.sock"
# A warm sandbox's runtime waits on this socket for its task (one byte: go).
START_SOCKET_NAME = "start.sock"
# A bulk connection starts with BULK_MAGIC, one byte giving the token's length,
# the token, and the ticket; a send ends with the parent's status line.
BULK_MAGIC = b"SE-BULK1"
BULK_TICKET_BYTES = 16
BULK_STATUS_MAX_BYTES = 4096

# Calls of one kind a task may have open at once (the mailbox stream and the
# heartbeat stream are one each). The parent refuses one more; the sandbox's
# client waits for a slot instead, so a protocol may send or receive from as
# many threads as it likes.
MAX_OPEN_SENDS = 2
MAX_OPEN_RECEIVES = 4
MAX_OPEN_SHARE_RECEIVES = 1
# Bulk transfers a task may have at once (executor/rpc/bulk.py): connections the
# parent serves (one more is closed at once) and tickets it may hold unused (one
# more is refused). The sandbox's client holds to both in the same way: a
# transfer waits for a slot, kept from its ticket to its end.
MAX_BULK_CONNECTIONS = 4
MAX_BULK_TICKETS = 4

# -- secure aggregation --------------------------------------------------------
# Shares per SendSecureShares call, and a share's size: what RSA-2048 with
# OAEP-SHA256 can seal in one block (2048 // 8 - 2 * 32 - 2 bytes).
MAX_SHARES = 256
MAX_SHARE_BYTES = 190
MAX_POD_ID_CHARS = 256


# -- reports (the Report call) ----------------------------------------------------
class ReportCase(enum.StrEnum):
    """What one Report call carries: the names of ``executor.v1.ReportRequest``'s ``report`` cases."""

    PROGRESS = "progress"
    FILES = "files"
    ROWS = "rows"
    # A named number (``ctx.report("metric", name=..., value=...)``): a name
    # as a result column's (is_column_name) and a finite value.
    METRIC = "metric"


# -- progress and per-file outcomes --------------------------------------------
MAX_INFO_CHARS = 1024
# Progress steps (ctx.progress.step) go to the parent at most once per this
# interval, the latest kept and sent when the interval is up: the child
# coalesces them, and the parent coalesces again what reaches it (a child need
# not be honest). Run and epoch boundaries are never coalesced; a step
# waiting is sent before the next boundary and before the result.
PROGRESS_STEP_INTERVAL_S = 0.25
MAX_FILES_PER_CALL = 1000
MAX_FILE_NAME_CHARS = 1024
MAX_FILE_REASON_CHARS = 1000

# -- result rows (a Report of rows) ---------------------------------------------
# A row is one flat JSON object: column name -> JSON scalar. Per call the
# parent accepts at most MAX_ROWS_PER_CALL rows and MAX_ROWS_BYTES_PER_CALL
# bytes of row text (one chunk's worth, so a call always fits the parent's
# message cap); the child splits what a protocol saves into such calls.
MAX_ROWS_PER_CALL = 1000
MAX_ROWS_BYTES_PER_CALL = CHUNK_BYTES
# One row's JSON text in UTF-8 bytes, its columns, and a column name's characters.
MAX_ROW_BYTES = 64 * 1024
MAX_COLUMNS = 256
MAX_COLUMN_NAME_CHARS = 128
# Integer values fit a signed 64-bit column (SQLite's INTEGER) exactly.
MIN_ROW_INT = -(2**63)
MAX_ROW_INT = 2**63 - 1


def is_column_name(name: object) -> bool:
    """Whether ``name`` may name a result column.

    1 to :data:`MAX_COLUMN_NAME_CHARS` characters, none of them a control
    character or a lone surrogate: a column name ends up in databases, CSV
    headers and terminals, where a NUL, a newline or an escape sequence is
    never data.
    """
    return (
        isinstance(name, str)
        and 0 < len(name) <= MAX_COLUMN_NAME_CHARS
        and not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or 0xD800 <= ord(c) < 0xE000 for c in name)
    )


def row_problem(row: Mapping[Any, Any]) -> tuple[str, Any] | None:
    """The first rule of result rows that ``row`` breaks, or ``None``: the rule both sides apply.

    A row has 1 to :data:`MAX_COLUMNS` columns, each named as
    :func:`is_column_name` allows and holding a string (valid Unicode), an
    integer within signed 64 bits, a finite number, a boolean or null. The
    sandbox checks a protocol's dict with it before anything is sent; the
    parent checks each row it parsed from the wire.

    Returns:
        Why (words to follow "result row N"), and the column at fault (or
        ``None``), which only the sandbox names in its message.
    """
    if not 0 < len(row) <= MAX_COLUMNS:
        return f"must have 1 to {MAX_COLUMNS} columns", None
    for name, value in row.items():
        if not is_column_name(name):
            return (
                f"has a column name that is not 1 to {MAX_COLUMN_NAME_CHARS} characters "
                "free of control characters and lone surrogates",
                name,
            )
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # not text any strict reader accepts
                return "holds a lone surrogate", name
        elif isinstance(value, int):
            if not MIN_ROW_INT <= value <= MAX_ROW_INT:
                return "holds an integer outside the signed 64-bit range", name
        elif isinstance(value, float):
            if not math.isfinite(value):
                return "holds a number that is not finite (NaN or infinity)", name
        else:
            return "has a value that is not a JSON scalar (string, number, boolean or null)", name
    return None


# -- the terminal report (and the TASK_ABORT body the child sends) -------------
MAX_ERROR_TYPE_CHARS = 200
MAX_ERROR_MESSAGE_CHARS = 4096
MAX_TRACEBACK_CHARS = 16_384
