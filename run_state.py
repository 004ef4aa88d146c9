"""What a run keeps beside the captions: the lock, the record of captions it wrote, and
`failures.jsonl`.

They live at the output root (`output.dir`, or the images folder): the lock and the
record in a hidden `.tagcaption/` folder, `failures.jsonl` in plain sight.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from files import atomic_write_text

STATE_DIR = ".tagcaption"
FAILURES_FILE = "failures.jsonl"


class LockedError(Exception):
    pass


@dataclass
class Failure:
    image: str
    stage: str
    kind: str
    message: str
    attempts: int = 0


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


class RunLock:
    """One run per output folder. A lock left by a process that no longer runs is taken over."""

    def __init__(self, root: Path):
        self.path = root / STATE_DIR / "lock"
        self.held = False

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when a stale lock was taken over."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        note = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner and _alive(owner):
                    raise LockedError(
                        f"another run (pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}) "
                        f"is captioning this folder: lock {self.path}. Wait for it, or delete the lock if that "
                        "process is gone") from None
                note = f"took over the lock {self.path} left by a run that is no longer running"
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}, handle)
            self.held = True
            return note
        raise LockedError(f"could not take the lock {self.path}")

    def _owner(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # unreadable or half-written: its writer died while creating it

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False
            with contextlib.suppress(OSError):
                self.path.parent.rmdir()  # only when nothing else is kept there


def _alive(owner: dict) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # a run on another machine sharing this folder: we cannot tell, so respect it
    try:
        os.kill(int(owner.get("pid", 0)), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return int(owner.get("pid", 0)) > 0


class CaptionRecord:
    """The hash of every caption this program wrote, so a caption edited by hand since (or
    never written by us) is recognised and kept before it is replaced.

    An append-only JSON-lines file: a crash can at worst leave a torn last line, which is
    ignored when read.
    """

    def __init__(self, root: Path):
        self.root = root
        self.path = root / STATE_DIR / "captions.jsonl"
        self.hashes: Dict[str, str] = {}

    def load(self) -> None:
        if not self.path.exists():
            return
        lines = 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            lines += 1
            try:
                entry = json.loads(line)
                self.hashes[entry["file"]] = entry["sha1"]
            except (ValueError, KeyError, TypeError):
                continue
        if lines > 2 * len(self.hashes) + 100:
            atomic_write_text(self.path, "".join(self._line(f, h) for f, h in self.hashes.items()))

    def _key(self, caption_file: Path) -> str:
        try:
            return caption_file.relative_to(self.root).as_posix()
        except ValueError:
            return str(caption_file)

    @staticmethod
    def _line(file: str, digest: str) -> str:
        return json.dumps({"file": file, "sha1": digest}, ensure_ascii=False) + "\n"

    def is_ours(self, caption_file: Path, text: str) -> bool:
        return self.hashes.get(self._key(caption_file)) == sha1(text)

    def record(self, caption_file: Path, text: str) -> None:
        key, digest = self._key(caption_file), sha1(text)
        self.hashes[key] = digest
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(self._line(key, digest))


def write_failures(path: Path, failures: Iterable[Failure]) -> None:
    atomic_write_text(path, "".join(json.dumps(asdict(f), ensure_ascii=False) + "\n" for f in failures))


def read_failed_images(path: Path) -> List[str]:
    images = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            images.append(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError):
            continue
    return images
