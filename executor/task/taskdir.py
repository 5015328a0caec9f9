"""Per-task directories: the socket, the bootstrap token and the bundle.

Layout of one task directory (its name is random, so that other local users
who cannot list the base directory cannot find it)::

    <base>/<random>/            0711
        ipc/                    mounted read-only at /run/sandbox
            sandbox.sock        the task's gRPC server
            bulk.sock           its bulk path for large mailbox bodies (executor/rpc/bulk.py)
            start.sock          a warm slot's runtime waits here for its task (gone once made)
            lifeline.sock       init's one connection to the parent (gone once made)
            token               the bootstrap token, readable by the sandbox user
        protocol/               the bundle, mounted read-only at /sandbox/protocol
        data/                   the batch's data view, mounted read-only at /data
        resolv.conf             empty, mounted read-only over /etc/resolv.conf

A batched task keeps its directory and bundle from batch to batch; each batch
that starts cold gets a fresh ``ipc/`` and ``resolv.conf`` (:meth:`TaskDir.renew`)
and ``data/`` view. A task's own directory is made without them
(``ipc=False``): a batch served by a warm slot uses the slot's directory and
only the task's bundle. The directory is removed whatever happens to the task.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from executor.sandbox.contract import BULK_SOCKET_NAME, START_SOCKET_NAME

if TYPE_CHECKING:
    from types import TracebackType

SOCKET_NAME = "sandbox.sock"
LIFELINE_NAME = "lifeline.sock"
TOKEN_NAME = "token"  # noqa: S105 (a file name, not a secret)
OWNER_NAME = "owner"
# Mounted over the engine's /etc/resolv.conf, which names the host's resolver:
# a network-less sandbox has no use for DNS configuration.
RESOLV_NAME = "resolv.conf"


# A task directory's name: this prefix and tempfile.mkdtemp's 8 random characters.
_NAME_PREFIX = "t-"
_NAME_RANDOM_CHARS = 8
DATA_NAME = "data"


def data_view_path(base: Path) -> Path:
    """A path as long as any task directory's data view under ``base`` (its name is random)."""
    return base / (_NAME_PREFIX + "x" * _NAME_RANDOM_CHARS) / DATA_NAME


def remove_tree(path: Path) -> None:
    """Delete a task directory, including its read-only parts; no error if gone."""
    if not path.exists():
        return
    for root, dirs, _ in os.walk(path):
        for d in dirs:
            with contextlib.suppress(OSError):
                os.chmod(os.path.join(root, d), 0o700)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o700)
    shutil.rmtree(path, ignore_errors=True)


class TaskDir:
    """A fresh task directory with its own token; a context manager that removes it.

    Args:
        base: The directory that holds all task directories.
        sandbox_uid: The uid the sandbox runs as; when the parent is root the
            IPC directory is handed to that uid alone.
        owner: The executor instance that owns it, for the reaper.
        sandbox_gid: The group the sandbox runs as; by default ``sandbox_uid``.
            The IPC directory gives the group nothing: other tasks share it.
        ipc: Make the IPC directory, token and ``resolv.conf`` now; without,
            :meth:`renew` makes them for the first container.
    """

    def __init__(
        self,
        base: Path,
        sandbox_uid: int,
        owner: str = "",
        *,
        sandbox_gid: int | None = None,
        ipc: bool = True,
    ) -> None:
        base.mkdir(mode=0o711, parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix=_NAME_PREFIX, dir=base))
        self.sandbox_uid = sandbox_uid
        self.sandbox_gid = sandbox_uid if sandbox_gid is None else sandbox_gid
        self.token = secrets.token_urlsafe(32)
        try:
            # First, so a concurrent reaper can tell whose directory this is.
            (self.path / OWNER_NAME).write_text(owner)
            self.path.chmod(0o711)
            self.ipc = self.path / "ipc"
            self.protocol = self.path / "protocol"
            self.data = self.path / DATA_NAME
            self.resolv_conf = self.path / RESOLV_NAME
            if ipc:
                self._make_ipc()
        except BaseException:
            self.remove()
            raise

    def _make_ipc(self) -> None:
        if not self.resolv_conf.exists():
            fd = os.open(self.resolv_conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
            os.fchmod(fd, 0o444)  # whatever the umask
            os.close(fd)
        self.ipc.mkdir(mode=0o700)
        fd = os.open(self.ipc / TOKEN_NAME, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.token)

    def renew(self) -> None:
        """A fresh IPC directory and token, for the task's next container (its next batch).

        Call once the previous container is gone and its server stopped: the
        old socket, lifeline and token go with the old directory, so nothing
        of one batch's sandbox can reach the next one's. In a directory made
        with ``ipc=False`` the first call makes them.
        """
        remove_tree(self.ipc)
        self.token = secrets.token_urlsafe(32)
        self._make_ipc()

    @property
    def socket_path(self) -> Path:
        """The path of the task's Unix socket."""
        return self.ipc / SOCKET_NAME

    @property
    def bulk_path(self) -> Path:
        """The path of the task's bulk socket (large mailbox bodies, raw)."""
        return self.ipc / BULK_SOCKET_NAME

    @property
    def start_path(self) -> Path:
        """Where a warm slot's runtime waits for its task (see :class:`executor.task.lifeline.StartLine`)."""
        return self.ipc / START_SOCKET_NAME

    @property
    def lifeline_path(self) -> Path:
        """Where the parent waits for the sandbox init's lifeline connection."""
        return self.ipc / LIFELINE_NAME

    def grant_to_sandbox(self) -> None:
        """Let the sandbox user reach the socket and read the token.

        Call once the server (and the lifeline, if any) is listening. As root,
        the IPC directory, sockets and token are given to the sandbox uid and
        closed to everyone else; otherwise they are opened to all, behind the
        unguessable directory name.
        """
        token = self.ipc / TOKEN_NAME
        socks = [
            p for p in (self.socket_path, self.bulk_path, self.lifeline_path, self.start_path) if p.exists()
        ]
        if os.geteuid() == 0:
            for p in (self.ipc, *socks, token):
                os.chown(p, self.sandbox_uid, self.sandbox_gid)
            self.ipc.chmod(0o500)
            for p in socks:
                p.chmod(0o600)
            token.chmod(0o400)
        else:
            self.ipc.chmod(0o711)
            for p in socks:
                p.chmod(0o666)
            token.chmod(0o644)

    def remove(self) -> None:
        """Delete the directory and everything in it; safe to call twice."""
        remove_tree(self.path)

    def __enter__(self) -> TaskDir:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()
