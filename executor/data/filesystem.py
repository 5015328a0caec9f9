"""Whether a datasource and the run directory are on one filesystem: the one place that is checked.

A view can hard-link a datasource file only into a directory on the file's
own filesystem; elsewhere it needs a bind mount per file. The selection's
path rules, the bind budget and ``doctor`` all ask :func:`same_filesystem`.
"""

from __future__ import annotations

import os
from pathlib import Path


def _device(path: Path) -> int:
    """The filesystem of ``path`` or its nearest existing ancestor (the run directory may not exist yet)."""
    for p in (path, *path.parents):
        try:
            return os.stat(p).st_dev
        except OSError:
            continue
    return os.stat("/").st_dev


def same_filesystem(run_dir: Path, data_dir: Path) -> bool:
    """Whether ``data_dir`` is on the filesystem of ``run_dir`` (or of its nearest existing ancestor).

    Raises:
        OSError: ``data_dir`` cannot be read.
    """
    return os.stat(data_dir).st_dev == _device(run_dir)


def may_link(run_dir: Path, data_dir: Path) -> bool:
    """Whether views of ``data_dir`` can be hard links in ``run_dir`` (one filesystem).

    Cheap and optimistic: a file the kernel still refuses to link (another
    user's, under ``fs.protected_hardlinks``) shows only when the view is made.
    """
    try:
        return same_filesystem(run_dir, data_dir)
    except OSError:
        return False


def protected_hardlinks() -> bool:
    """Whether the kernel refuses a non-root user hard links to files it does not own."""
    try:
        return Path("/proc/sys/fs/protected_hardlinks").read_text().strip() == "1"
    except OSError:
        return False
