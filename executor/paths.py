"""Where the executor keeps its files unless the caller says otherwise: one rule, four places.

Each place is chosen the same way: its environment variable wins; then a system
directory when running as root; then a per-user directory. The run and uid
directories stay short, which keeps socket paths below the 107-byte limit of
``sun_path``. The uid directory is never inside the run directory, which the
reaper empties.

========================  ==============================  ====================================
place                     variable                        root default
========================  ==============================  ====================================
task directories          ``SANDBOX_EXECUTOR_RUN_DIR``    ``/run/sandbox-executor``
mailbox spool             ``SANDBOX_EXECUTOR_SPOOL_DIR``  ``/var/tmp/sandbox-executor``
uid leases and permits    ``SANDBOX_EXECUTOR_UID_DIR``    ``/run/sandbox-executor-uids``
project database's dir    ``SANDBOX_EXECUTOR_STATE_DIR``  ``/var/lib/sandbox-executor``
========================  ==============================  ====================================
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENV_RUN_DIR = "SANDBOX_EXECUTOR_RUN_DIR"
ENV_SPOOL_DIR = "SANDBOX_EXECUTOR_SPOOL_DIR"
ENV_UID_DIR = "SANDBOX_EXECUTOR_UID_DIR"
ENV_STATE_DIR = "SANDBOX_EXECUTOR_STATE_DIR"

DB_FILE_NAME = "projects.sqlite"


@dataclass(frozen=True)
class _Place:
    """How one place is found: its variable, its root directory, and its per-user fallback."""

    env: str
    root_dir: str
    user_name: str  # the per-user directory's name in the system temporary directory
    xdg: str | None = None  # an XDG variable consulted before the temporary directory

    def resolve(self) -> Path:
        env = os.environ.get(self.env)
        if env:
            return Path(env)
        if os.geteuid() == 0 and Path(self.root_dir).parent.is_dir():
            return Path(self.root_dir)
        if self.xdg is not None:
            xdg = os.environ.get(self.xdg)
            # The XDG spec says a relative value is invalid and must be ignored.
            if xdg and os.path.isabs(xdg) and Path(xdg).is_dir():
                return Path(xdg) / "sandbox-executor"
        return Path(tempfile.gettempdir()) / f"{self.user_name}-{os.geteuid()}"


_RUN = _Place(ENV_RUN_DIR, "/run/sandbox-executor", "sandbox-executor", xdg="XDG_RUNTIME_DIR")
_SPOOL = _Place(ENV_SPOOL_DIR, "/var/tmp/sandbox-executor", "sandbox-executor-spool")
_UIDS = _Place(ENV_UID_DIR, "/run/sandbox-executor-uids", "sandbox-executor-uids")


def run_dir() -> Path:
    """Where task directories go (sockets, tokens, bundles, data views)."""
    return _RUN.resolve()


def spool_dir() -> Path:
    """Where large mailbox bodies are staged: on disk, since they can be big."""
    return _SPOOL.resolve()


def uid_dir() -> Path:
    """Where uid leases and start permits live: one directory for every executor of this user."""
    return _UIDS.resolve()


def db_path() -> Path:
    """The project database's file.

    ``$SANDBOX_EXECUTOR_STATE_DIR/projects.sqlite`` wins; then
    ``/var/lib/sandbox-executor/projects.sqlite`` for root; then
    ``$XDG_STATE_HOME/sandbox-executor/projects.sqlite``, or
    ``~/.local/state/sandbox-executor/projects.sqlite`` without it. Unlike the
    other places it is never in the temporary directory: the ledger must outlive
    a reboot.
    """
    env = os.environ.get(ENV_STATE_DIR)
    if env:
        return Path(env) / DB_FILE_NAME
    if os.geteuid() == 0:
        return Path("/var/lib/sandbox-executor") / DB_FILE_NAME
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".local" / "state"
    return base / "sandbox-executor" / DB_FILE_NAME
