"""`--dataset`: captioned rows into the output dataset, as writer.py writes caption files.

Each caption goes to `captions.jsonl` the moment it is made, and its row into the part
being gathered; every `save_interval` rows the part is saved (in a thread, while captioning
goes on). At the end of a run that was not stopped, the parts are joined into the dataset
`load_from_disk(output_path)` opens, and pushed to the Hub if `dataset.push_to_hub` says so.
After a stop the rows gathered are saved as a part, and the next run joins them.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from tagcaption.config import Config
from tagcaption.deadlines import off_loop
from tagcaption.errors import ConfigError, LockedError, OutputProblem
from tagcaption.files import atomic_write_text
from tagcaption.hf_dataset import DatasetSource, Row
from tagcaption.hf_output import DatasetLayout, PartStore
from tagcaption.layout import Layout
from tagcaption.sinks import redact
from tagcaption.state import Failure, RunLock, write_failures
from tagcaption.tally import Tally

log = logging.getLogger("caption")


@dataclass
class Kept:
    """A row for the output, with its caption and description (None: what the row holds)."""
    row: Row
    caption: Optional[str]
    description: Optional[str] = None


class RowWriter:
    def __init__(self, config: Config, layout: DatasetLayout, store: PartStore, source: DatasetSource, tally: Tally,
                 *, dry_run: bool, describes: bool, stopped: Callable[[], bool], owner: Tuple[str, str]):
        self.config, self.layout, self.store, self.source, self.tally = config, layout, store, source, tally
        self.settings = config.dataset
        self.dry_run, self.stopped, self.owner = dry_run, stopped, owner
        self.description_column = self.settings.description_column if describes else None
        self.lock = RunLock(layout.lock)
        self.gathered: List[Kept] = []

    def start(self) -> None:
        """Take the output's lock and finish what a killed run left (once; not in a dry run)."""
        if self.dry_run or self.lock.held:
            return
        try:
            self.layout.root.mkdir(parents=True, exist_ok=True)
            note = self.lock.acquire()
        except (LockedError, OSError) as exc:
            raise ConfigError(str(exc)) from None
        if note:
            log.warning("warning: %s", note)
        self.layout.images_root = self.layout.root
        self.store.claim(*self.owner)

    # --- per row -------------------------------------------------------------------------

    async def keep(self, row: Row, caption: Optional[str], description: Optional[str] = None) -> None:
        """A row done before this run (its caption column's text, or a killed run's caption)."""
        if not self.dry_run:
            await self._gather(Kept(row, caption, description))

    async def write(self, captioned) -> None:
        if self.dry_run:
            self.tally.update("images.captioned")
            return
        row: Row = captioned.item.row
        record = {"id": row.id, "index": row.index,
                  **{key: value for key, value in captioned.record.items() if key != "file"}}
        try:
            await off_loop(self.store.record, record, seconds=None, what=f"writing {self.layout.captions_jsonl}")
        except OSError as exc:
            raise OutputProblem(f"cannot write {self.layout.captions_jsonl}: {exc.strerror or exc}",
                                stage="output") from None
        description = captioned.record.get("description") or None
        self.tally.update("images.captioned")
        await self._gather(Kept(row, captioned.caption, description))

    async def _gather(self, kept: Kept) -> None:
        """Every `save_interval` rows, the part saved (awaited by the one worker that filled it,
        in a thread: the others go on captioning)."""
        self.gathered.append(kept)
        if len(self.gathered) < self.settings.save_interval:
            return
        batch, self.gathered = self.gathered, []
        try:
            await off_loop(self._save, batch, seconds=None, what="saving a part")
        except Exception as exc:  # the captions are in captions.jsonl; the end of the run tries again
            log.debug("saving a part failed", exc_info=True)
            log.error("error: cannot save %d rows as a part under %s (%s); trying again at the end",
                      len(batch), self.layout.parts, getattr(exc, "strerror", None) or exc)
            self.gathered[:0] = batch

    def _save(self, batch: List[Kept]) -> Path:
        return self.store.save_part(lambda: self._part(batch), [kept.row.id for kept in batch],
                                    [kept.row.index for kept in batch])

    def _part(self, batch: List[Kept]):
        """The batch's rows as a dataset: the source's columns, the caption and description
        set (a None keeps what the row holds)."""
        library = self.source.library
        columns = [(self.settings.caption_column, [kept.caption for kept in batch])]
        if self.description_column:
            columns.append((self.description_column, [kept.description for kept in batch]))
        columns = [(name, [redact(value) if value else value for value in values]) for name, values in columns]
        if self.source.streaming:
            rows = [dict(kept.row.data) for kept in batch]
            for name, values in columns:
                for row, value in zip(rows, values):
                    row[name] = value if value is not None else row.get(name)
            features = self.source.features.copy() if self.source.features else None
            if features is not None:
                for name, _ in columns:
                    if getattr(features.get(name), "dtype", "null") == "null":
                        features[name] = library.Value("string")
            return library.Dataset.from_list(rows, features=features)
        part = self.source.raw.select([kept.row.index for kept in batch])
        for name, values in columns:
            if name in part.column_names:
                values = [new if new is not None else old for new, old in zip(values, part[name])]
                part = part.remove_columns(name)
            part = part.add_column(name, values)
            part = part.cast_column(name, library.Value("string"))
        return part

    # --- start and end -------------------------------------------------------------------

    async def drain(self, seconds: Optional[float] = None) -> None:
        """Nothing to wait for: a part's save is awaited by the worker that filled it."""

    def close(self) -> Optional[Path]:
        """The rows gathered saved as a part, and after a run that was not stopped, the parts
        joined (and pushed); then the lock released. No review page: returns None."""
        if self.dry_run or not self.lock.held:
            return None
        try:
            with self.store.saving:  # a part still being saved finishes first
                pass
            if self.gathered:
                self._save(self.gathered)
                self.gathered = []
            if not self.stopped():
                self._join()
            elif any(self.layout.parts.glob("part-*")):
                log.warning("note: the rows captioned are saved in parts under %s; rerun the same command to go "
                            "on, and the dataset is joined when a run finishes", self.layout.parts)
        except Exception as exc:  # the captions are in the parts and captions.jsonl: the next run goes on
            log.debug("saving the dataset failed", exc_info=True)
            log.error("error: cannot save the captioned dataset in %s (%s); what was captioned is kept, and the "
                      "next run finishes it", self.layout.root, getattr(exc, "strerror", None) or exc)
        finally:
            self.lock.release()
        return None

    def _join(self) -> None:
        joined = self.store.join(self.source.library)
        if joined is not None:
            log.info("Dataset saved: %d rows in %s", joined, self.layout.root)
        repo = self.settings.push_to_hub
        if not repo or not (self.layout.root / "state.json").is_file():
            return
        log.info("Pushing %s to the Hugging Face Hub as %s…", self.layout.root, repo)
        try:
            self.source.library.load_from_disk(str(self.layout.root)).push_to_hub(repo)
        except Exception as exc:  # the dataset is saved; only the push is left to do
            log.error("error: cannot push to %s (%s); the dataset is saved in %s: rerun the same command to push it",
                      repo, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__,
                      self.layout.root)

    def save_failures(self, failures: List[Failure]) -> Optional[Path]:
        """`failures.jsonl` under output_path lists this run's failed rows by id."""
        path = self.layout.failures
        if self.dry_run or (not failures and not path.exists()):
            return None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_failures(path, failures)
        except OSError as exc:
            log.error("error: cannot write %s (%s); the failures are listed above", path, exc.strerror or exc)
            return None
        return path

    async def write_transcript(self, debug_dir: Path, item, transcript: dict) -> None:
        """`--debug-dir`: the row's whole conversation, no API keys."""
        text = json.dumps({"image": str(item.path), **transcript}, ensure_ascii=False, indent=2) + "\n"
        path = Layout.transcript(debug_dir, item)

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
        await off_loop(write, seconds=None, what=f"writing {path}")
