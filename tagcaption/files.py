"""Writing files so that a crash at any moment leaves either the old file or the new one.

Temporary files are hidden (leading dot), carry TEMP_MARK and end in `.tmp`, so no
later run can mistake one for a caption, a tags file or a cache, and one left by a
killed run can be recognised and removed.
"""
from __future__ import annotations

import errno
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Optional

from tagcaption.sinks import redact

TEMP_MARK = ".tagcaption-"
TEMP_NAME = re.compile(r"^\..+\.tagcaption-[A-Za-z0-9_]+\.tmp$")


def json_text(value: object) -> str:
    """`value` as one line of JSON that can be written as UTF-8: non-ASCII text as it is, unless
    it holds a lone surrogate (a file name that is not UTF-8, kept by Python as `\\udcff`), in
    which case everything is escaped, which `json.loads` reads back exactly."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(value)
    return text


def is_leftover_temp(name: str) -> bool:
    return bool(TEMP_NAME.match(name))


def _read_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


_UMASK = _read_umask()
"""Read once, at import, while one thread runs: reading it sets it for a moment, and a file
another thread created in that moment would get the wrong permissions."""


def _mode_for(path: Path) -> int:
    """The permissions the file has, or a new file would get (mkstemp's 0600 is too private
    for a dataset folder shared with a trainer or other users)."""
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return 0o666 & ~_UMASK


def _write_temp(path: Path, data: bytes, mode: Optional[int] = None) -> str:
    """The folder must exist: a write never recreates a folder that went away (callers make
    the folders of `output.dir` themselves)."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _mode_for(path) if mode is None else mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        os.unlink(temp)
        raise
    return temp


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step (temp file in the same folder + rename). Every
    text the program writes passes here, so no configured API key reaches a file, and no text a
    server sent (a lone UTF-16 surrogate in an error message) can stop a file being written."""
    temp = _write_temp(path, redact(text).encode("utf-8", "replace"))  # a lone surrogate from a server: '?' 
    try:
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def write_new_file(path: Path, data: bytes, like: Optional[Path] = None) -> bool:
    """Create `path` with `data` atomically (with the permissions of `like`, when given),
    but never replace an existing file. Returns False (and writes nothing) when it exists.
    """
    temp = _write_temp(path, data, _mode_for(like) if like is not None and like.exists() else None)
    try:
        os.link(temp, path)
        return True
    except FileExistsError:
        return False
    except OSError:
        # No hard links (FAT/exFAT drives, some network shares). The run lock makes this
        # check-then-rename safe against ourselves.
        if path.exists():
            return False
        os.replace(temp, path)
        return True
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def read_regular(path: Path) -> bytes:
    """The bytes of a regular file; OSError for a FIFO, device or socket, refused by `stat`
    before it is opened (opening a FIFO waits for a writer that never comes)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file (a FIFO, device or socket)", str(path))
    with open(path, "rb") as handle:
        return handle.read()
