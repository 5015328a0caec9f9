"""Which project store a path or URL names: :func:`open_store` and the registry of store kinds.

A plain path, or ``sqlite:///path/to/pod.db`` (``sqlite:relative.db``
relative to the working directory), opens the SQLite store; ``memory:`` a
new, empty in-memory one. Adding a store kind is one module implementing
:class:`~executor.data.store.ProjectStore` and one entry in :data:`STORES`.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from executor.data.memory import MemoryStore
from executor.data.sqlite import ProjectDatabase
from executor.errors import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable

    from executor.data.store import ProjectStore


def _sqlite(url: urllib.parse.SplitResult) -> ProjectStore:
    if url.netloc not in ("", "localhost") or url.query or url.fragment or not url.path:
        raise ConfigurationError(
            f"a SQLite project store is sqlite:///path/to/file.db, not {urllib.parse.urlunsplit(url)!r}"
        )
    return ProjectDatabase(Path(urllib.parse.unquote(url.path)))


def _memory(url: urllib.parse.SplitResult) -> ProjectStore:
    return MemoryStore()


STORES: dict[str, Callable[[urllib.parse.SplitResult], ProjectStore]] = {
    "sqlite": _sqlite,
    "memory": _memory,
}
"""Store kinds by URL scheme: each opens a store from its parsed URL."""

# A URL's scheme as RFC 3986 spells it; anything else (no colon before the
# first slash, say) is a path.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:")


def open_store(path_or_url: Path | str) -> ProjectStore:
    """The project store at ``path_or_url``: a path (SQLite) or a URL whose scheme is in :data:`STORES`.

    Raises:
        ConfigurationError: The URL's scheme is not a known store kind, or
            the URL is malformed for its kind.
        ProjectDatabaseError: The store is there but unusable (see its kind).
    """
    if isinstance(path_or_url, Path) or not _SCHEME.match(path_or_url):
        return ProjectDatabase(Path(path_or_url))
    url = urllib.parse.urlsplit(path_or_url)
    opener = STORES.get(url.scheme.lower())
    if opener is None:
        known = ", ".join(f"{scheme}:" for scheme in sorted(STORES))
        raise ConfigurationError(
            f"unknown project store {path_or_url!r}: its scheme {url.scheme!r} is not one of {known}"
            " (or give a plain path for SQLite)"
        )
    return opener(url)


__all__ = ["STORES", "open_store"]
