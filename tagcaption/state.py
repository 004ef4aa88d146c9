"""What a run keeps beside the captions: the lock, the record of captions it wrote, and
`failures.jsonl` (their paths come from layout.py)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from tagcaption.errors import LockedError
from tagcaption.files import atomic_write_text, json_text

@dataclass
class Failure:
    image: str
    stage: str
    kind: str
    message: str
    attempts: int = 0


def sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()


class RunLock:
    """One run per output folder: an exclusive `flock` on `.tagcaption/lock`. The kernel
    releases it when the process ends however it ends, so a dead run's lock is never in
    the way; the file itself only names the holder for the message."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: Optional[int] = None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a note when the last holder did not end cleanly."""
        self.path.parent.mkdir(exist_ok=True)  # in the images folder, which exists: never recreated
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _flock(fd, fcntl.LOCK_EX):
            time.sleep(0.1)  # another shard may be probing this lock for an instant (others_running)
        if not _flock(fd, fcntl.LOCK_EX):
            owner = _owner(fd)
            os.close(fd)
            who = (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
                   if owner else "another process")
            raise LockedError(f"another run ({who}) is captioning this folder: lock {self.path}. "
                              "Wait for it to finish") from None
        previous = _owner(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self._fd = fd
        if previous:
            return (f"took over the lock {self.path} from a run that did not end cleanly "
                    f"(pid {previous.get('pid')}, started {previous.get('started')})")
        return None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def others_running(self) -> bool:
        """Whether another run holds another lock of this folder (another shard) right now."""
        for path in self.path.parent.glob("lock*"):
            if path == self.path:
                continue
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                if not _flock(fd, fcntl.LOCK_SH):
                    return True
            finally:
                os.close(fd)  # and with it the probe's own lock
        return False

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty lock file means the last run ended cleanly
            os.close(self._fd)  # closing releases the flock
            self._fd = None


def _flock(fd: int, kind: int) -> bool:
    try:
        fcntl.flock(fd, kind | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _owner(fd: int) -> Optional[dict]:
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data) if data.strip() else None
    except (OSError, ValueError, RecursionError):
        return None
    return owner if isinstance(owner, dict) else None


class CaptionRecord:
    """The hash of every caption this program wrote, by path, so that a caption edited by
    hand since (or never written by us) is recognised and kept before it is replaced, and
    so that no caption of ours is ever read back as tags.

    An append-only JSON-lines file: a crash can at worst leave a torn last line, which is
    ignored when read. Paths inside `root` (the images folder) are kept relative to it, so
    the folder can move; others (an `output.dir` elsewhere) as absolute paths.
    """

    def __init__(self, root: Path, path: Path):
        self.root = root
        self.path = path
        self.hashes: Optional[Dict[str, str]] = None
        """Read only when a caption is about to be replaced, so a first run holds none of it."""
        self._lock = threading.Lock()  # captions are written from several threads
        self._folder_made = False

    def load(self) -> None:
        self.hashes = {}
        if not self.path.exists():
            return
        lines = 0
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            lines += 1
            try:
                entry = json.loads(line)
                self.hashes[entry["file"]] = entry["sha1"]
            except (ValueError, KeyError, TypeError, RecursionError):
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
        return json_text({"file": file, "sha1": digest}) + "\n"

    def wrote(self, path: Path) -> bool:
        """Whether this program wrote a caption at `path` (edited since or not)."""
        with self._lock:
            if self.hashes is None:
                self.load()
            return bool(self.hashes) and self._key(path) in self.hashes

    def adopt(self, old: Path, old_root: Path) -> None:
        """Take over the record a run before 0.2 kept at `old` (keys relative to `old_root`)."""
        if self.path.exists() or not old.exists():
            return
        lines = []
        for line in old.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                lines.append(self._line(self._key(old_root / entry["file"]), entry["sha1"]))
            except (ValueError, KeyError, TypeError, RecursionError):
                continue
        atomic_write_text(self.path, "".join(lines))
        self.hashes = None

    def is_ours(self, caption_file: Path, text: str) -> bool:
        with self._lock:
            if self.hashes is None:
                self.load()
            return self.hashes.get(self._key(caption_file)) == sha1(text)

    def record(self, caption_file: Path, text: str) -> None:
        key, digest = self._key(caption_file), sha1(text)
        with self._lock:
            if self.hashes is not None:
                self.hashes[key] = digest
            if not self._folder_made:
                self.path.parent.mkdir(exist_ok=True)
                self._folder_made = True
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(self._line(key, digest))


def write_failures(path: Path, failures: Iterable[Failure]) -> None:
    atomic_write_text(path, "".join(json_text(asdict(f)) + "\n" for f in failures))


def read_failed_images(path: Path) -> List[str]:
    """The images a failures file names; a line that is not one of ours (damaged, not UTF-8)
    is passed over, as in every journal of the run."""
    images = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            images.append(json.loads(line)["image"])
        except (ValueError, KeyError, TypeError, RecursionError):
            continue
    return images
