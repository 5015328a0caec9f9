"""The wire contract: what the child pre-truncates to, the parent accepts, from one module."""

from __future__ import annotations

from executor.sandbox import contract
from executor.sandbox.runtime import _error, _summarise


def _deep(n: int) -> None:
    if n:
        _deep(n - 1)
    raise ValueError("x" * 100_000)


def test_the_childs_longest_error_report_is_accepted_by_the_parent(make_session):
    try:
        _deep(200)
    except ValueError as exc:
        report = _error("E" * 10_000, "m" * 100_000, _summarise(exc))
    assert len(report.error.traceback) == contract.MAX_TRACEBACK_CHARS
    assert len(report.error.message) == contract.MAX_ERROR_MESSAGE_CHARS
    assert len(report.error.type) == contract.MAX_ERROR_TYPE_CHARS
    kit = make_session()
    kit.session.report_finish(
        "ERROR", "", report.error.type, report.error.message, report.error.traceback, {}
    )
    assert kit.session.finish is not None
    assert kit.session.finish.traceback == report.error.traceback


def test_both_sides_read_each_fact_from_the_contract():
    import executor.data.fileoutcomes as fileoutcomes
    import executor.mailbox.crypto as crypto
    import executor.rpc.auth as auth
    import executor.rpc.limits as limits
    import executor.rpc.session as session
    import executor.sandbox.init as init

    assert auth.TOKEN_METADATA_KEY is contract.TOKEN_METADATA_KEY
    assert limits.CHUNK_BYTES is contract.CHUNK_BYTES
    assert crypto.MAX_SHARE_BYTES is contract.MAX_SHARE_BYTES
    assert session.SENDABLE is contract.SENDABLE
    assert session.RECEIVABLE is contract.RECEIVABLE
    assert fileoutcomes.MAX_FILE_NAME_CHARS is contract.MAX_FILE_NAME_CHARS
    assert init.EXIT_PARENT_GONE is contract.EXIT_PARENT_GONE
    # A share of the contract's size is what RSA-2048 OAEP-SHA256 can seal in one block.
    assert contract.MAX_SHARE_BYTES == 2048 // 8 - 2 * 32 - 2
