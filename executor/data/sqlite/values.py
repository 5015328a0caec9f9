"""How the SQLite store writes times (UTC ISO 8601 text) and listing limits."""

from __future__ import annotations

from datetime import UTC, datetime

from executor.data.store import check_limit


def iso(value: datetime) -> str:
    """An aware time as UTC ISO 8601 text, to the microsecond."""
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def now() -> str:
    """The time now, as :func:`iso` writes it."""
    return iso(datetime.now(UTC))


def time(text: str) -> datetime:
    """A time :func:`iso` wrote."""
    return datetime.fromisoformat(text)


def one_line(text: str) -> str:
    """``text`` with its runs of whitespace (line breaks too) as single spaces."""
    return " ".join(text.split())


def limit_clause(limit: int | None, params: list[object]) -> str:
    """`` LIMIT ?`` with ``limit`` appended to ``params``, or nothing without a limit."""
    if limit is None:
        return ""
    check_limit(limit)
    params.append(limit)
    return " LIMIT ?"
