"""The path rules of a data view: which datasource file names a view can show at all.

A file shows in a view as ``<view>/<name>`` on the host and ``<sandbox data
path>/<name>`` inside, and a bind-mounted one is mounted from
``<datasource>/<name>``. The kernel takes no path of :data:`PATH_MAX` bytes or
more and no name component over :data:`NAME_MAX`; :class:`ViewPaths` says
which files break that for a task's views, so that the selection leaves them
out rather than fail every view they are in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from executor.data.filesystem import may_link

if TYPE_CHECKING:
    from pathlib import Path

PATH_MAX = 4096
"""Bytes of a path the kernel takes, its terminating NUL included (Linux): a longer one is ENAMETOOLONG."""
NAME_MAX = 255
"""Bytes of one name component on Linux's filesystems (ext4, tmpfs, overlayfs)."""


def name_parts(name: str) -> list[str]:
    """The components of a datasource-relative name; ``ValueError`` if it could leave the root."""
    parts = name.split("/")
    if not name or "\0" in name or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a datasource-relative file name: {name!r}")
    return parts


@dataclass(frozen=True)
class ViewPaths:
    """The directories a file's path is made under when a data view shows it; each must leave room.

    A file shows in a view as ``<view>/<name>`` on the host and
    ``<sandbox data path>/<name>`` inside, and a bind-mounted one is mounted
    from ``<datasource>/<name>``; each such path must be shorter than
    :data:`PATH_MAX` bytes, and no component of ``name`` longer than
    :data:`NAME_MAX`. One file deep or long enough to break that would fail
    the making of every view it is in, so
    :func:`~executor.data.selection.select` leaves it out and counts it
    ``skipped_unusable`` instead.

    Attributes:
        roots: The directories (as the parent passes them to the kernel or the engine).
    """

    roots: tuple[str, ...]

    @classmethod
    def of(
        cls, run_dir: Path, data_dir: Path, method: str, sandbox_data: str, *, view_dir: Path
    ) -> ViewPaths:
        """The roots of ``data_dir``'s views made in ``run_dir`` by ``method``, shown at ``sandbox_data``.

        ``view_dir`` is a host path as long as any view's in ``run_dir`` (the
        task directory names it: :func:`executor.task.taskdir.data_view_path`).

        The datasource counts only when views will be bind mounts; a file
        that unexpectedly needs one anyway is left out of its view then.
        """
        roots = [str(view_dir), sandbox_data]
        if method == "bind" or (method == "auto" and not may_link(run_dir, data_dir)):
            roots.append(os.path.realpath(data_dir))
        return cls(tuple(roots))

    def reason(self, name: str) -> str | None:
        """Why no view can show datasource file ``name``, or ``None`` if one can."""
        raw = os.fsencode(name)
        longest = max(len(part) for part in raw.split(b"/"))
        if longest > NAME_MAX:
            return f"a component of its name is {longest} bytes, over the {NAME_MAX} a name may have"
        for root in self.roots:
            size = len(os.fsencode(root.rstrip("/"))) + 1 + len(raw)
            if size >= PATH_MAX:
                return f"its path under {root} would be {size} bytes, over the {PATH_MAX - 1} a path may have"
        return None
