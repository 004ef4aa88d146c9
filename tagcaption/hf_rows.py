"""`--dataset`: which rows this run captions, as selection.py decides it for a folder: this
machine's shard (by a hash of the row id), a sample, or last run's failures; rows already
in the output, or whose caption column holds text, skipped; rows sharing an id failed.

The walk yields each row's id; the row itself waits in `waiting` until the captioner takes
it, a moment later (run.py's producer asks for it right away). Rows are read in chunks off
the event loop: a streamed dataset may wait on the network.
"""
from __future__ import annotations

import asyncio
import random
import threading
from pathlib import Path
from typing import AsyncIterator, Callable, Dict, Iterator, List, Optional

from tagcaption.deadlines import off_loop
from tagcaption.errors import CaptionCollision, ConfigError
from tagcaption.hf_dataset import DatasetSource, Row
from tagcaption.hf_output import DatasetLayout, PartStore
from tagcaption.selection import Shard, WalkCounts, count_in_background
from tagcaption.state import read_failed_images
from tagcaption.tally import Tally

ROW_CHUNK = 64
"""Rows read in one turn off the event loop."""


def _chunk(rows: Iterator[Row]) -> List[Row]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == ROW_CHUNK:
            break
    return chunk


def _rows(count: int) -> str:
    return f"{count} row{'' if count == 1 else 's'}"


class RowSelection(WalkCounts):
    def __init__(self, source: DatasetSource, store: PartStore, layout: DatasetLayout, tally: Tally, fail: Callable,
                 make_item: Callable, *, overwrite: bool, shard: Shard, retry_failed: bool, sample: Optional[int],
                 seed: int, keep: Callable, start: Callable[[], None], file_timeout: float):
        self.source, self.store, self.layout, self.tally, self.fail = source, store, layout, tally, fail
        self.make_item, self.keep, self.start = make_item, keep, start
        self.overwrite, self.shard, self.retry_failed, self.sample, self.seed = \
            overwrite, shard, retry_failed, sample, seed
        self.file_timeout = file_timeout
        self.counted = asyncio.Event()
        self.waiting: Dict[str, Row] = {}

    def take(self, row_id: str) -> Row:
        return self.waiting.pop(row_id)

    async def walk(self) -> AsyncIterator[str]:
        """The ids of the rows that need a caption, as the walk reaches them."""
        failed = self._failed_before() if self.retry_failed else None
        self.start()  # the output's lock, before its parts are read
        done = set() if self.overwrite else self.store.done_ids()
        recorded = {} if self.overwrite else self.store.recorded(done)
        stop_counting = threading.Event()
        rows = self._sampled(failed) if self.sample is not None else self.source.rows()
        if self.sample is None:
            self._count(failed, stop_counting)
        seen: set = set()
        try:
            while chunk := await off_loop(_chunk, rows, seconds=None, what="reading the dataset's rows"):
                for row in chunk:
                    if self._selected(row, failed) and await self._needs_caption(row, done, recorded, seen):
                        self.waiting[row.id] = row
                        self.tally.update("images.pending")
                        yield row.id
        finally:
            stop_counting.set()

    def _selected(self, row: Row, failed: Optional[set]) -> bool:
        return self.shard.includes(row.id) and (failed is None or str(Path(row.id or ".")) in failed)

    async def _needs_caption(self, row: Row, done: set, recorded: dict, seen: set) -> bool:
        """Whether the row is captioned now; one done is skipped (and, with a caption of its
        own or one a killed run recorded, kept in the output), one that cannot be is failed."""
        if not row.id or row.id in seen:
            why = "its id is empty" if not row.id else f"another row has the id {row.id!r}"
            self.tally.update("images.rejected")
            self.fail(self.make_item(row, self.layout.root), CaptionCollision(
                f"{why}: set dataset.id_column to a column whose values differ in every row", stage="input"))
            return False
        seen.add(row.id)
        if row.id in done:
            self.tally.update("images.skipped")
            return False
        if row.id in recorded or (row.caption and not self.overwrite):
            record = recorded.get(row.id) or {}
            await self.keep(row, record.get("caption") or row.caption, record.get("description") or None)
            self.tally.update("images.skipped")
            return False
        return True

    def _count(self, failed: Optional[set], stop: threading.Event) -> None:
        """The rows this run is asked for: known at once unless a shard or the failures pick
        among them, which a thread counts (a streamed dataset's are counted as they come)."""
        every_row = self.shard.count == 1 and failed is None
        if every_row or self.source.streaming:
            self.tally.set("images.selected", (self.source.num_rows or 0) if every_row else 0)
            self.counted.set()
            return
        count_in_background((self._selected(row, failed) for row in self.source.rows()), stop, self.tally,
                            self.counted, "count-rows")

    def _sampled(self, failed: Optional[set]) -> Iterator[Row]:
        """`--sample N`: the same N rows of the selection for a seed, whatever is done since."""
        indices = [row.index for row in self.source.rows() if self._selected(row, failed)]
        if len(indices) > self.sample:
            indices = sorted(random.Random(self.seed).sample(indices, self.sample))
        self.tally.set("images.selected", len(indices))
        self.counted.set()
        return self.source.rows(indices)

    def _failed_before(self) -> set:
        if not self.layout.failures.exists():
            raise ConfigError(f"--retry-failed: no {self.layout.failures} from an earlier run")
        return set(read_failed_images(self.layout.failures))

    def why_empty(self) -> str:
        """Why the walk found no row to caption, in one line; ConfigError (exit 2) when the
        dataset has no rows at all."""
        skipped, walked = self.tally["images.skipped"], self.walked
        if skipped and skipped == walked:
            some = "" if self.shard.count == 1 and self.sample is None and not self.retry_failed else " selected"
            return (f"all {_rows(skipped)}{some} have captions (in {self.layout.root} or in the caption column); "
                    "add output.overwrite=true to caption them again")
        if walked:
            return "no row left to caption (the others failed, see above)"
        if self.retry_failed:
            return f"none of the rows listed in {self.layout.failures} is in the dataset now: nothing to retry"
        if self.shard.count > 1 and self.source.num_rows:
            return f"this shard's share ({self.shard.index}/{self.shard.count}) of the {_rows(self.source.num_rows)} " \
                   "is empty"
        raise ConfigError(f"the dataset {self.source.describe()} has no rows")

