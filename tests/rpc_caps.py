"""The parent's RPC-edge caps as literal numbers: what the tests expect, not what the code says.

A unit test (tests/unit/test_service.py) asserts that every constant in
``executor.rpc.limits`` and ``executor.rpc.session`` equals its value here, and the
RPC attack suite takes its expected numbers from this table, never from the
code under test: a cap raised in the code fails both, instead of moving the
expectation along with it. Change a value here only on purpose.
"""

from __future__ import annotations

MiB = 1024 * 1024
SERVICE = "/executor.v1.Sandbox/"

# executor/rpc/limits.py
MAX_CONNECTIONS = 8
MAX_STREAMS_PER_CONNECTION = 12
MAX_CONCURRENT_RPCS = 96
CONCURRENCY = {
    f"{SERVICE}Heartbeat": 1,
    f"{SERVICE}SendMessage": 2,
    f"{SERVICE}ReceiveMessage": 4,
    f"{SERVICE}GetSecureShares": 1,
    f"{SERVICE}Mailbox": 1,
}
RATE_PER_S = 1000.0
RATE_BURST = 2000
FILES_PER_TOKEN = 10
ROWS_PER_TOKEN = 10
BEATS_PER_S = 25.0
BEAT_BURST = 50
ABUSE_REFUSALS = 5000
ABUSE_FORGIVE_PER_S = 500.0
CHUNK_BYTES = 1 * MiB
ENVELOPE_HEADROOM = 64 * 1024
MAX_METADATA_BYTES = 8 * 1024
REQUEST_WAIT_S = 5.0
REQUEST_GRACE_S = 1.0
STREAM_GAP_S = 60.0
MAX_AWAITING_REQUESTS = 8
IDLE_CONNECTION_MS = 60_000
HANDSHAKE_TIMEOUT_MS = 5_000
SERVER_THREADS = 25

# executor/rpc/bulk.py and the bulk path's part of the contract
BULK_MAX_CONNECTIONS = 4
BULK_MAX_TICKETS = 4
BULK_TICKET_TTL_S = 30.0
BULK_HEADER_TIMEOUT_S = 5.0
BULK_IDLE_TIMEOUT_S = 60.0
BULK_MIN_BYTES = 2 * MiB
BULK_TICKET_BYTES = 16

# executor/rpc/session.py (and executor/data/fileoutcomes.py, which it re-exports)
MAX_RECEIVE_TIMEOUT_S = 600.0
MAX_PENDING_RECEIVES = 4
MAX_SHARES = 256
MAX_SHARE_BYTES = 190
MAX_INFO_CHARS = 1024
MAX_FILES_PER_CALL = 1000
MAX_FILE_REASON_CHARS = 1000
MAX_ROWS_PER_CALL = 1000
MAX_ROWS_BYTES_PER_CALL = 1 * MiB
MAX_ROW_BYTES = 64 * 1024

SERVICE_CAPS: dict[str, object] = {
    "MAX_CONNECTIONS": MAX_CONNECTIONS,
    "MAX_STREAMS_PER_CONNECTION": MAX_STREAMS_PER_CONNECTION,
    "MAX_CONCURRENT_RPCS": MAX_CONCURRENT_RPCS,
    "CONCURRENCY": CONCURRENCY,
    "RATE_PER_S": RATE_PER_S,
    "RATE_BURST": RATE_BURST,
    "FILES_PER_TOKEN": FILES_PER_TOKEN,
    "ROWS_PER_TOKEN": ROWS_PER_TOKEN,
    "BEATS_PER_S": BEATS_PER_S,
    "BEAT_BURST": BEAT_BURST,
    "ABUSE_REFUSALS": ABUSE_REFUSALS,
    "ABUSE_FORGIVE_PER_S": ABUSE_FORGIVE_PER_S,
    "CHUNK_BYTES": CHUNK_BYTES,
    "ENVELOPE_HEADROOM": ENVELOPE_HEADROOM,
    "MAX_METADATA_BYTES": MAX_METADATA_BYTES,
    "REQUEST_WAIT_S": REQUEST_WAIT_S,
    "REQUEST_GRACE_S": REQUEST_GRACE_S,
    "STREAM_GAP_S": STREAM_GAP_S,
    "MAX_AWAITING_REQUESTS": MAX_AWAITING_REQUESTS,
    "IDLE_CONNECTION_MS": IDLE_CONNECTION_MS,
    "HANDSHAKE_TIMEOUT_MS": HANDSHAKE_TIMEOUT_MS,
    "SERVER_THREADS": SERVER_THREADS,
}
BULK_CAPS: dict[str, object] = {
    "MAX_CONNECTIONS": BULK_MAX_CONNECTIONS,
    "MAX_TICKETS": BULK_MAX_TICKETS,
    "TICKET_TTL_S": BULK_TICKET_TTL_S,
    "HEADER_TIMEOUT_S": BULK_HEADER_TIMEOUT_S,
    "IDLE_TIMEOUT_S": BULK_IDLE_TIMEOUT_S,
}
CONTRACT_BULK_CAPS: dict[str, object] = {
    "BULK_MIN_BYTES": BULK_MIN_BYTES,
    "BULK_TICKET_BYTES": BULK_TICKET_BYTES,
}
SESSION_CAPS: dict[str, object] = {
    "MAX_RECEIVE_TIMEOUT_S": MAX_RECEIVE_TIMEOUT_S,
    "MAX_PENDING_RECEIVES": MAX_PENDING_RECEIVES,
    "MAX_SHARES": MAX_SHARES,
    "MAX_SHARE_BYTES": MAX_SHARE_BYTES,
    "MAX_INFO_CHARS": MAX_INFO_CHARS,
    "MAX_FILES_PER_CALL": MAX_FILES_PER_CALL,
    "MAX_FILE_REASON_CHARS": MAX_FILE_REASON_CHARS,
    "MAX_ROWS_PER_CALL": MAX_ROWS_PER_CALL,
    "MAX_ROWS_BYTES_PER_CALL": MAX_ROWS_BYTES_PER_CALL,
    "MAX_ROW_BYTES": MAX_ROW_BYTES,
}


def attack_limits() -> dict[str, float]:
    """The numbers the RPC attack protocol expects (it cannot import the parent's modules)."""
    return {
        "max_connections": MAX_CONNECTIONS,
        "send_message_open": CONCURRENCY[f"{SERVICE}SendMessage"],
        "receive_message_open": CONCURRENCY[f"{SERVICE}ReceiveMessage"],
        "heartbeat_open": CONCURRENCY[f"{SERVICE}Heartbeat"],
        "rate_per_s": RATE_PER_S,
        "rate_burst": RATE_BURST,
        "chunk_bytes": CHUNK_BYTES,
        "max_metadata_bytes": MAX_METADATA_BYTES,
        "max_receive_timeout_s": MAX_RECEIVE_TIMEOUT_S,
        "max_pending_receives": MAX_PENDING_RECEIVES,
        "max_shares": MAX_SHARES,
        "max_share_bytes": MAX_SHARE_BYTES,
        "max_info_chars": MAX_INFO_CHARS,
        "max_files_per_call": MAX_FILES_PER_CALL,
        "files_per_token": FILES_PER_TOKEN,
        "max_file_reason_chars": MAX_FILE_REASON_CHARS,
    }
