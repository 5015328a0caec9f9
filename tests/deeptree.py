"""Datasource trees whose paths are longer than the kernel takes, made through directory descriptors."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

COMPONENT = 240
"""Bytes of each directory name: under NAME_MAX (255), so the filesystem takes every one."""


def deep_file(root: Path, length: int, content: bytes = b"deep\n") -> str:
    """Make a file under ``root`` whose name relative to it is exactly ``length`` bytes; its name.

    Each directory is made and entered relative to its parent's descriptor,
    so no path passed to the kernel is longer than one name: the tree may be
    deeper than PATH_MAX. The leaf (``deep...csv``) takes what the
    directories leave, between 16 and 16 + COMPONENT bytes.
    """
    if length < 16:
        raise ValueError("a deep file's name is at least 16 bytes")
    parts: list[str] = []
    while length - sum(len(p) + 1 for p in parts) > COMPONENT + 16:
        parts.append(f"{len(parts):03d}" + "d" * (COMPONENT - 3))
    leaf_len = length - sum(len(p) + 1 for p in parts)
    leaf = "deep" + "e" * (leaf_len - 8) + ".csv"
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in parts:
            os.mkdir(name, 0o755, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=fd)
        try:
            os.write(out, content)
        finally:
            os.close(out)
    finally:
        os.close(fd)
    name = "/".join([*parts, leaf])
    assert len(name) == length
    return name
