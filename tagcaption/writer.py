"""Everything a run writes, and the rules that keep what the user has.

Before a caption replaces a file, what it would replace is kept: the tags (see layout.py),
or a caption this program did not write or that was edited since (as `.bak`, `.bak2`…).
Each caption is written atomically in a thread that, once started, always finishes and
is counted: a cancelled worker does not stop it, and the run waits for it before it
releases the lock. The lock, the leftovers of a killed run, the journal of records and
`failures.jsonl` are handled here too.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import List, Optional, Set

from tagcaption.captioner import Captioned
from tagcaption.config import Config
from tagcaption.deadlines import off_loop
from tagcaption.errors import (CaptionAppeared, CaptionCollision, ConfigError, LockedError, NoBackupName,
                               OutputProblem)
from tagcaption.files import atomic_write_text, read_regular, write_new_file
from tagcaption.folder import Folder
from tagcaption.layout import ImageItem, Layout
from tagcaption.outputs import DatasetOutputs
from tagcaption.postprocess import only_text_values
from tagcaption.report import build_report
from tagcaption.remember import remember
from tagcaption.state import Failure, RunLock, write_failures
from tagcaption.tally import Tally
from tagcaption.vocabulary import IMAGE_EXTENSIONS

log = logging.getLogger("caption")

LEFTOVER_AGE = 60.0
"""Seconds after which a temp file is a killed run's leftover even while other shards write."""


class Writer:
    def __init__(self, config: Config, layout: Layout, folder: Folder, tally: Tally, dry_run: bool = False):
        self.config, self.layout, self.folder, self.tally = config, layout, folder, tally
        self.dry_run = dry_run
        self.lock = RunLock(layout.lock)
        self.record = layout.record
        formats = list(config.output.formats) + (["jsonl"] if config.output.report else [])  # the page reads it
        self.outputs = DatasetOutputs(formats, layout)
        self._writes: Set[asyncio.Future] = set()
        self._folders: Set[Path] = set()
        """Folders of output.dir made (or found) for captions: asked of the disk once each."""

    # --- start and end -------------------------------------------------------------------

    def start(self) -> None:
        """Take the folder's lock, remove a killed run's leftovers, merge its journal."""
        if self.dry_run:
            return
        try:
            note = self.lock.acquire()
        except (LockedError, OSError) as exc:
            raise ConfigError(str(exc)) from None
        if note:
            log.warning("warning: %s", note)
        if self.layout.output_dir is not None:
            try:
                self.layout.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ConfigError(f"output.dir {self.layout.output_dir} cannot be made a folder: "
                                  f"{exc.strerror or exc}") from None
        self.remove_leftover_temps()
        self._adopt_old_state()
        self.outputs.merge()
        remember(self.config, self.layout)

    def _adopt_old_state(self) -> None:
        """Runs before 0.2 kept their state under `output.dir`: read it once, from here on."""
        old = self.layout.old_state_dir
        if old is None or not old.is_dir():
            return
        self.record.adopt(old / "captions.jsonl", self.layout.root)
        for journal in old.glob("records*.jsonl"):
            with contextlib.suppress(OSError):
                journal.replace(self.layout.state_dir / journal.name.replace("records", "journal", 1))

    async def drain(self, seconds: Optional[float] = None) -> None:
        """Wait for every caption write under way (after a stop, at most `seconds`: a write
        stuck on a dead share must not keep the run from ending)."""
        if self._writes:
            await asyncio.wait(list(self._writes), timeout=seconds)

    def fold_in_leftovers(self) -> None:
        """A run with nothing to caption still writes the records a run before it could not
        (a dataset file that was a folder, a kill during the end-of-run files): the journal
        is merged under the lock, and `close` writes the files."""
        if self.dry_run or not self.outputs.journal.exists():
            return
        try:
            self.start()
        except ConfigError:  # another run holds the folder: it merges them when it ends
            return

    def close(self) -> Optional[Path]:
        """Dataset files and the page, then the lock; returns the page, if written."""
        page = None
        try:
            if self.lock.held and self.layout.images_root.is_dir():
                self.remove_leftover_temps()
                page = self._finish_outputs()
        finally:
            self.lock.release()
        return page

    def remove_leftover_temps(self) -> None:
        """Temp files of a killed run, found by the walk. While another shard runs, a young
        one may be its write in progress: then only those LEFTOVER_AGE older than this run's
        lock go (both times from the same file server's clock)."""
        try:
            alone = not self.lock.others_running()
            cutoff = self.lock.path.stat().st_mtime - LEFTOVER_AGE
        except OSError:
            return
        while self.folder.leftover_temps:
            leftover = self.folder.leftover_temps.pop()
            with contextlib.suppress(OSError):
                if alone or leftover.stat().st_mtime <= cutoff:
                    leftover.unlink()

    def _finish_outputs(self) -> Optional[Path]:
        try:
            self.outputs.merge()
            if self.config.output.report:
                return build_report(self.config)
        except Exception as exc:  # one bad input must not cost the end of a run whose captions are written
            log.debug("the dataset files failed", exc_info=True)
            log.error("error: cannot write the dataset files (%s); the captions are written, and the next run "
                      "merges this run's records", getattr(exc, "strerror", None) or exc)
        return None

    def save_failures(self, failures: List[Failure]) -> Optional[Path]:
        """`failures.jsonl` lists this run's failures (an empty file when there were none);
        returns it when written."""
        path = self.layout.failures
        if self.dry_run or (not failures and not path.exists()):
            return None
        if not path.parent.is_dir():
            log.error("error: cannot write %s: its folder is gone; the failures are listed above", path)
            return None
        try:
            write_failures(path, failures)
        except OSError as exc:
            log.error("error: cannot write %s (%s); the failures are listed above", path, exc.strerror or exc)
            return None
        return path

    # --- per image -----------------------------------------------------------------------

    async def write(self, captioned: Captioned) -> None:
        if self.dry_run:
            self.tally.update("images.captioned")
            return
        write = asyncio.ensure_future(off_loop(self._write_caption, captioned, seconds=None,
                                               what=f"writing {captioned.item.caption_file}"))
        self._writes.add(write)

        def done(future: asyncio.Future) -> None:
            self._writes.discard(future)
            if not future.cancelled() and future.exception() is None:
                self.tally.update("images.captioned")
        write.add_done_callback(done)
        try:
            await asyncio.shield(write)
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise OutputProblem(f"{exc.strerror or exc}{where}", stage="output") from None

    async def write_transcript(self, debug_dir: Path, item: ImageItem, transcript: dict) -> None:
        """`--debug-dir`: the image's whole conversation, no API keys."""
        record = {"image": str(item.path), **transcript}
        text = json.dumps(record, ensure_ascii=False, indent=2) + "\n"
        path = self.layout.transcript(debug_dir, item)
        await off_loop(_write_in, path, text, seconds=None, what=f"writing {path}")

    def _write_caption(self, captioned: Captioned) -> None:
        item = captioned.item
        folder = item.caption_file.parent
        if self.layout.output_dir is not None and folder not in self._folders and self.layout.output_dir.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            self._folders.add(folder)
        if captioned.structured is not None and item.structured_file is not None:
            # Before the caption, which marks the image done: if the caption then cannot be
            # written, the .caption.json (recorded as ours) stays and is replaced by the next run.
            self._write_structured(item, captioned.structured)
        if item.tags_file is not None and item.tags_file == item.caption_file:
            # The caption replaces the tags file: its exact bytes are kept first (see layout.py).
            write_new_file(item.tags_backup, read_regular(item.caption_file), like=item.caption_file)
        elif item.caption_file.exists() and not self._replaceable(item):
            if not self.config.output.overwrite:
                raise CaptionAppeared(f"{item.caption_file} appeared during the run; not replaced", stage="output")
            self._keep_backup(item.caption_file)
        self.record.record(item.caption_file, captioned.caption)  # first: a kill in between only costs a spare .bak
        atomic_write_text(item.caption_file, captioned.caption)
        self.outputs.record(captioned.record)

    def _write_structured(self, item: ImageItem, data: object) -> None:
        """`<stem>.caption.json`. One this program did not write (or that was edited since) is
        kept as `.bak` with output.overwrite, else left and the image fails; one that is the
        `<stem>.json` sidecar of an image beside it is never replaced."""
        path = item.structured_file
        text = json.dumps(only_text_values(data), ensure_ascii=False, indent=2, allow_nan=False) + "\n"
        if path.exists() and not self.record.is_ours(path, read_regular(path).decode("utf-8", "replace")):
            owner = next((image for ext in IMAGE_EXTENSIONS for image in (path.with_suffix(ext),
                                                                       path.with_suffix(ext.upper())) if image.exists()),
                         None)
            if owner is not None:
                raise CaptionCollision(f"{path.name} is the sidecar of {owner.name}, and would be this image's "
                                       "structured caption; rename one of the images", stage="output")
            if not self.config.output.overwrite:
                raise CaptionAppeared(f"{path} exists and was not written by tagcaption (or was edited since); not "
                                      "replaced: add output.overwrite=true to keep it as .bak and replace it",
                                      stage="output")
            self._keep_backup(path)
        self.record.record(path, text)
        atomic_write_text(path, text)

    def _replaceable(self, item: ImageItem) -> bool:
        current = read_regular(item.caption_file)
        kept = item.tags_backup
        if kept is not None and kept.exists() and current == read_regular(kept):
            return True  # a tags file whose copy is already kept
        return self.record.is_ours(item.caption_file, current.decode("utf-8", "replace"))

    def _keep_backup(self, caption_file: Path) -> None:
        data = read_regular(caption_file)
        for number in range(1, 1000):
            suffix = ".bak" if number == 1 else f".bak{number}"
            if write_new_file(caption_file.with_name(caption_file.name + suffix), data, like=caption_file):
                self.tally.update("images.backups")
                return
        raise NoBackupName(f"no free backup name for {caption_file}", stage="output")


def _write_in(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, text)
