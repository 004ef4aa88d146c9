"""One image through the stages: its tags read ahead, their knowledge, the vision model's
description, the caption. Nothing here writes a file; every way an image can fail leaves
as an `ImageProblem` naming the stage it failed in.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Union

from tagcaption.alternatives import Caption
from tagcaption.config import Config
from tagcaption.deadlines import off_loop
from tagcaption.errors import (ImageProblem, NothingToCaption, NoVision, OutputProblem, TagsFileError,
                               os_error_text)
from tagcaption.faithfulness import faithfulness_record
from tagcaption.hints import HintInput, collect_hints
from tagcaption.images import check_image, check_image_data
from tagcaption.layout import KEPT_TAGS_MARK, ImageItem, Layout
from tagcaption.placeholders import image_values
from tagcaption.plan import CATEGORY_VARIABLES
from tagcaption.postprocess import add_affixes, only_text
from tagcaption.stages import Stages
from tagcaption.tagfiles import ImageTags, read_image_tags

TAG_NAMES = {"tags", "booru_tags"} | CATEGORY_VARIABLES
"""The values that carry an image's tags into a prompt."""
MAX_TAG_LENGTH = 200
"""Characters; Danbooru's longest tag names are well below it."""

Tags = Union[ImageTags, ImageProblem]


@dataclass
class Captioned:
    item: ImageItem
    caption: str
    """The caption file's text: with `output.variants` > 1, one caption a line."""
    record: dict
    """The line for captions.jsonl / metadata.jsonl."""
    structured: Any = None
    """For `<stem>.caption.json`: the structured caption's object (a list of them, one per line,
    with `output.variants` > 1); None when the caption was not asked as JSON."""


class Captioner:
    def __init__(self, config: Config, layout: Layout, stages: Stages):
        self.config, self.layout, self.stages = config, layout, stages
        self.consumed = stages.plan.consumed
        self.count = config.output.variants

    async def prepare(self, rel: str) -> tuple:
        """The image and its tags (or why they could not be read); its tags' lookups and
        summaries start now, ahead of the image's turn."""
        path = Path(f"{self.layout.images_root}/{rel}")  # see Selection._to_caption
        try:
            item = self.layout.item(path)
        except OSError as exc:
            return ImageItem(path, Path(rel), path, None, None), TagsFileError(os_error_text(exc, path), stage="input")
        tags = await self._read_tags(item)
        if self.stages.tag_provider and isinstance(tags, ImageTags):
            self.stages.tag_provider.prefetch(self.to_look_up(tags))
        return item, tags

    async def _read_tags(self, item: ImageItem) -> Tags:
        settings = self.config.tags
        try:
            return await off_loop(read_image_tags, item.path, item.tags_file, settings.sources, settings.combine,
                                  item.not_sidecar, seconds=self.config.file_timeout,
                                  what=f"reading the tags of {item.path}")
        except OSError as exc:
            return TagsFileError(os_error_text(exc, item.tags_file, "tags file"), stage="tags")
        except ValueError as exc:
            return TagsFileError(f"cannot read tags: {exc}", stage="tags")
        except RecursionError:
            return TagsFileError("cannot read tags: a sidecar of this image is nested too deeply to be one "
                                 "(remove it or fix it)", stage="tags")
        except Exception as exc:  # a sidecar that breaks the parser must cost one image, not the run
            return TagsFileError(f"cannot read tags: {type(exc).__name__}: {exc}", stage="tags")

    def to_look_up(self, tags: ImageTags) -> List[str]:
        """Tags worth asking Danbooru about: not excluded, and short enough to be a tag at all
        (one overlong "tag" would break the URL of the whole batch it shares with others)."""
        return [tag for tag in tags.tags
                if len(tag) <= MAX_TAG_LENGTH and not self.stages.tag_filter.excluded_by_name(tag)]

    async def caption(self, item: ImageItem, tags: ImageTags, transcript: dict) -> Captioned:
        """The image's caption; `transcript` collects the conversations and guard trips."""
        stage, key = "tag_provider", item.rel.as_posix()
        try:
            values = await self._values(item, tags)
            described: List[str] = []
            check = self.stages.faithfulness.for_image(values) if self.stages.faithfulness else None
            if self.stages.interrogator:
                stage = "interrogator"
                described = await self.stages.interrogator.descriptions(
                    item.path, values, key, transcript, image_data=item.image,
                    count=1 if self.stages.interpreter else self.count,
                    check=check if self.stages.interpreter is None else None)
                values["description"] = described[0]
            stage = "interpreter"
            captions = await self.stages.interpreter.captions(values, key, transcript, check=check) \
                if self.stages.interpreter else [Caption(text) for text in described]
        except NoVision as exc:
            raise self._no_vision(exc) from None
        except ImageProblem as problem:
            problem.stage = problem.stage or stage
            raise
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise OutputProblem(f"{exc.strerror or exc}{where}", stage=stage) from None
        lines = [add_affixes(caption.text, self.config.postprocess.prefix, self.config.postprocess.suffix)
                 for caption in captions]
        data = [caption.data for caption in captions]
        structured = None if data[0] is None else data[0] if len(data) == 1 else data
        record = self._record(item, lines, values, transcript, structured)
        if check is not None:
            record.update(faithfulness_record(check, key, self.stages.llm.tally))
        return Captioned(item, "\n".join(lines), record, structured)

    async def _values(self, item: ImageItem, tags: ImageTags) -> Dict[str, str]:
        """Every template value for the image, its tags' knowledge awaited (the checks that
        need no model come first, and fail in the "input" stage)."""
        if not tags.tags and not self._carries_description():
            why = "the Interrogator is off" if not self.stages.interrogator else \
                "the caption template does not use the description"
            raise NothingToCaption(f"no tags ({self._where_tags_were_looked_for(item)}) and {why}: nothing to "
                                   "caption from", stage="input")
        if not self.stages.interrogator:
            check, image = (check_image, item.path) if item.image is None else (check_image_data, item.image)
            await off_loop(check, image, seconds=self.config.file_timeout, what=f"reading {item.path}")
        knowledge = {}
        if self.stages.tag_provider:
            knowledge = await self.stages.tag_provider.knowledge(self.to_look_up(tags))
        hints = ""
        if self.config.interrogator.hint_sources:
            hints = await off_loop(collect_hints, self.config.interrogator.hint_sources,
                                   HintInput(item.path, item.rel, tags.tags, item.not_sidecar),
                                   seconds=self.config.file_timeout,
                                   what=f"the hints of {item.path}")
        values = image_values(tags.tags, knowledge, tags.categories, tags.rating, self.stages.tag_filter,
                              filename=item.path.name, folder=item.rel.parent.as_posix(),
                              name=self.config.style.name, hints=hints,
                              max_descriptions=self.config.interpreter.max_tag_descriptions,
                              max_tokens=self.config.interpreter.tag_descriptions_tokens,
                              omit=self.config.style.omit_traits_of)
        if not self._carries_description() and not any(values.get(name) for name in TAG_NAMES & self.consumed):
            raise NothingToCaption(f"none of its tags reach the caption prompt ({', '.join(sorted(TAG_NAMES & self.consumed))}"
                                   " empty after tags.exclude and tags.exclude_categories), and no description "
                                   "goes into it: nothing to caption from", stage="input")
        return values

    def _where_tags_were_looked_for(self, item: ImageItem) -> str:
        extension, sources = self.config.tags_extension, self.config.tags.sources
        looked = []
        if "txt" in sources and extension:
            plain = f"{item.path.stem}{extension}"
            looked.append(f"{plain} is a caption this program wrote; tags would be in "
                          f"{item.path.stem}{KEPT_TAGS_MARK}{extension}" if item.ours and
                          item.caption_file.name == plain and item.caption_file.parent == item.path.parent
                          else f"{plain} missing or empty")
        if "sidecar" in sources:
            looked.append("no sidecar with tags")
        return "; ".join(looked) or "no tag source in tags.sources"

    def _carries_description(self) -> bool:
        """Whether the caption comes from a vision model's description (as the caption, or in
        the caption prompt), so an image needs no tags to be captioned."""
        if not self.stages.interrogator:
            return False
        return self.stages.interpreter is None or "description" in self.consumed

    def _no_vision(self, exc: NoVision) -> NoVision:
        settings = self.config.interrogator
        endpoint = self.stages.llm.endpoints[settings.endpoint]
        error = NoVision(f"the model '{settings.model}' on {endpoint.describe()} cannot see images ({exc}). "
                         "Load a vision model (for llama.cpp, start it with --mmproj) or set interrogator.model",
                         exc.attempts)
        error.stage = "interrogator"
        return error

    def _record(self, item: ImageItem, lines: List[str], values: Dict[str, str], transcript: dict,
                structured: Any) -> dict:
        """The image's line in the records: `caption` as written, and with `output.variants` > 1
        the captions as a list (`variants`); the structured caption's object (`structured`)."""
        models = {name: stage.settings.model for name, stage in self.stages.named() if stage is not None}
        record = {"file": item.rel.as_posix(), "caption": "\n".join(lines), "tags": values.get("tags", ""),
                  "description": only_text(values.get("description", "")), "models": models,
                  "guards": transcript.get("guards", []), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if self.count > 1:
            record["variants"] = list(lines)
        if structured is not None:
            record["structured"] = structured
        return record
