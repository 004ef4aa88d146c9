"""Writing files so that a crash at any moment leaves either the old file or the new one.

Temporary files are hidden (leading dot) and end in `.tmp`, so no later run can
mistake one for a caption, a tags file or a cache.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path


def _write_temp(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(temp)
        raise
    return temp


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step (temp file in the same folder + rename)."""
    temp = _write_temp(path, text.encode("utf-8"))
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def write_new_file(path: Path, data: bytes) -> bool:
    """Create `path` with `data` atomically, but never replace an existing file.

    Returns False (and writes nothing) when `path` already exists.
    """
    temp = _write_temp(path, data)
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(temp)
