"""`--dataset`: a dataset's rows through the same run as a folder's images (run.py).

run.py takes three parts from here instead of the folder's: `RowSelection` (which rows:
shard by row id, sample, retry-failed, rows done skipped), `RowCaptioner` (a row's tags
from its tags column and its image from its image column, held in memory) and `RowWriter`
(captioned rows saved as parts under output_path and joined at the end, hf_output.py). The
stages, guards, retries, failures and summary are the folder run's own.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Optional

from tagcaption.captioner import Captioner
from tagcaption.config import Config
from tagcaption.deadlines import off_loop
from tagcaption.errors import ConfigError, ImageProblem, NothingToCaption
from tagcaption.hf_dataset import DatasetSource, Row
from tagcaption.hf_output import DatasetLayout, PartStore
from tagcaption.hf_rows import RowSelection
from tagcaption.hf_writer import RowWriter
from tagcaption.layout import ImageItem
from tagcaption.tagfiles import ImageTags

log = logging.getLogger("caption")

NAME_PLACEHOLDER = "{name}"


@dataclass(frozen=True)
class RowItem(ImageItem):
    row: Optional[Row] = field(default=None, compare=False, repr=False)


def row_item(row: Row, root: Path) -> RowItem:
    """A row as the captioner and the failures list see an image: named by its id."""
    name = Path(row.id or f"row {row.index}")
    return RowItem(name, name, root, None, None, row=row)


def default_output(name: str, suffix: str) -> Path:
    """`<dataset>-captioned[-K-of-N]` in the current folder."""
    stem = Path(name.rstrip("/")).stem if Path(name).exists() else name.rstrip("/").split("/")[-1]
    return Path.cwd() / f"{stem or 'dataset'}-captioned{suffix}"


class DatasetRun:
    """What run.py takes for a dataset: the layout first (before the stages are built, so
    that a dataset that cannot be read stops the run before any server is asked), then the
    selection, captioner and writer."""

    def __init__(self, config: Config, options, tally):
        settings = config.dataset
        self.config, self.options, self.tally = config, options, tally
        self.source = DatasetSource(options.dataset, settings, show_progress=options.progress is not False)
        output = config.path(settings.output_path) if settings.output_path else \
            default_output(options.dataset, options.shard.suffix)
        if self.source.path is not None and output.resolve() == self.source.path.resolve():
            raise ConfigError(f"dataset.output_path {output} is the dataset itself: name another folder")
        self.layout = DatasetLayout(output, options.shard.suffix)
        self.store = PartStore(self.layout)
        self.shard = f"{options.shard.index}/{options.shard.count}"
        if not options.dry_run:
            self.store.check_owner(options.dataset, self.shard)
        self.fallback_name = config.style.name
        if settings.name_column:  # a style's {name} stays a placeholder, filled per row
            config.style.name = NAME_PLACEHOLDER
        if "jsonl" not in config.output.formats:  # captions.jsonl keeps every description (plan.py asks)
            config.output.formats = [*config.output.formats, "jsonl"]

    def parts(self, stages, fail, stopping: asyncio.Event):
        """The selection, captioner and writer of the run."""
        options, config = self.options, self.config
        describes = stages.plan.runs("interrogator") and bool(config.dataset.description_column)
        writer = RowWriter(config, self.layout, self.store, self.source, self.tally, dry_run=bool(options.dry_run),
                           describes=describes, stopped=stopping.is_set, owner=(options.dataset, self.shard))
        selection = RowSelection(self.source, self.store, self.layout, self.tally, fail, row_item,
                                 overwrite=config.output.overwrite, shard=options.shard,
                                 retry_failed=options.retry_failed, sample=options.sample, seed=options.seed,
                                 keep=writer.keep, start=writer.start, file_timeout=config.file_timeout)
        captioner = RowCaptioner(config, self, stages, selection)
        return selection, captioner, writer


class RowCaptioner(Captioner):
    """A row's tags from its tags column and its image from its image column, in memory."""

    def __init__(self, config: Config, dataset: DatasetRun, stages, selection: RowSelection):
        super().__init__(config, dataset.layout, stages)
        self.source, self.selection = dataset.source, selection
        self.fallback_name = dataset.fallback_name
        self.per_row_name = bool(config.dataset.name_column)

    async def prepare(self, rel: str) -> tuple:
        row = self.selection.take(rel)
        item = row_item(row, self.layout.root)
        try:
            image = await off_loop(self.source.image, row, seconds=self.config.file_timeout,
                                   what=f"reading the image of row {row.id}")
        except ImageProblem as problem:
            return item, problem
        tags = ImageTags(list(row.tags))
        if self.stages.tag_provider:
            self.stages.tag_provider.prefetch(self.to_look_up(tags))
        return replace(item, image=image), tags

    async def _values(self, item: RowItem, tags: ImageTags) -> Dict[str, str]:
        if not tags.tags and not self._carries_description():
            column = self.config.dataset.tags_column
            where = f"its {column} column is empty" if column else "dataset.tags_column is not set"
            why = "the Interrogator is off" if not self.stages.interrogator else \
                "the caption template does not use the description"
            raise NothingToCaption(f"no tags ({where}) and {why}: nothing to caption from", stage="input")
        values = await super()._values(item, tags)
        if self.per_row_name:
            values["name"] = item.row.name or self.fallback_name
            if not values["name"] and "name" in self.consumed:
                raise NothingToCaption(f"no name: its {self.config.dataset.name_column} column is empty and "
                                       "style.name is not set, and the prompt uses {name}", stage="input")
        return values
