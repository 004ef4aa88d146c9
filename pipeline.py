"""One run: folder → images → tags → stages → captions, in one direction.

A producer walks the pending images in order, reads each one's tags and starts their
summaries (so tag work runs ahead of the images that need it), and hands the image to
a bounded pool of workers. A worker takes one image through the Interrogator and the
Interpreter and writes its caption. Each image fails alone: its error is recorded and
the batch goes on.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import openai
from tqdm import tqdm

from config import Config, ConfigError
from dataset import Dataset, ImageItem, read_tags
from files import atomic_write_text, write_new_file
from hints import HintInput, collect_hints, unknown_sources
from images import ImageError
from interpreter import Interpreter, tag_values
from interrogator import Interrogator
from llm import LLM, LLMError, ServerUnreachable, StageUsage
from tag_provider import TagProvider, TagStats, TagSummaryError

log = logging.getLogger("caption")


@dataclass
class Failure:
    path: str
    reason: str


@dataclass
class RunResult:
    captioned: int = 0
    skipped: int = 0
    failures: List[Failure] = field(default_factory=list)
    tags: Optional[TagStats] = None
    danbooru_requests: int = 0
    danbooru_down: Optional[str] = None
    usage: Dict[str, StageUsage] = field(default_factory=dict)
    seconds: float = 0.0


class Run:
    def __init__(self, config: Config, progress: Optional[bool] = None):
        self.config = config
        self.progress = progress
        self.result = RunResult()
        try:
            self.dataset = Dataset(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        unknown = unknown_sources(config.interrogator.hint_sources)
        if unknown:
            raise ConfigError(f"interrogator.hint_sources: unknown source(s) {', '.join(unknown)}")
        self.llm = LLM.from_config(config)
        self.tag_bar = self.image_bar = None
        self.tag_provider = None if config.tag_provider.skip else TagProvider(
            config, self.llm, on_tag_done=self._tag_done, on_tags_found=self._tags_found)
        self.interrogator = None if config.interrogator.skip else Interrogator(config, self.llm)
        self.interpreter = None if config.interpreter.skip else Interpreter(config, self.llm)

    async def execute(self) -> RunResult:
        started = time.monotonic()
        try:
            pending = self._pending_images()
            if pending:
                await self._check_servers()
                await self._caption_all(pending)
        finally:
            await self._close()
            self.result.seconds = time.monotonic() - started
        return self.result

    def _pending_images(self) -> List[ImageItem]:
        try:
            images = self.dataset.find_images()
        except (ValueError, OSError) as exc:
            raise ConfigError(str(exc)) from None
        pending, owners = [], {}
        for path in images:
            item = self.dataset.item(path)
            if item.caption_file in owners:
                self._fail(item, f"its caption file {item.caption_file.name} is also the caption of "
                                 f"{owners[item.caption_file].name}; rename one of them")
            elif not self.config.output.overwrite and item.has_caption():
                self.result.skipped += 1
            else:
                owners[item.caption_file] = path
                pending.append(item)
        return pending

    def _used_endpoints(self) -> Dict[str, List]:
        used: Dict[str, List] = {}
        for stage in (self.tag_provider, self.interrogator, self.interpreter):
            if stage is not None:
                used.setdefault(stage.settings.endpoint, []).append(stage.settings.model)
        return used

    async def _check_servers(self) -> None:
        """Fail fast (exit 2) when a server the run needs does not answer at all."""
        for name, models in self._used_endpoints().items():
            endpoint = self.llm.endpoints[name]
            try:
                listed = await endpoint.list_models()
            except ServerUnreachable as exc:
                raise ConfigError(str(exc)) from None
            except openai.OpenAIError as exc:
                log.warning("warning: %s could not list its models (%s); going on", endpoint.describe(), exc)
                continue
            for model in sorted(set(models)):
                if listed and model not in listed:
                    log.warning("warning: model '%s' is not listed by %s (it lists: %s)",
                                model, endpoint.describe(), ", ".join(listed[:8]))

    async def _caption_all(self, pending: List[ImageItem]) -> None:
        show = self.progress
        total = len(pending) + self.result.skipped + len(self.result.failures)
        if self.tag_provider:
            self.tag_provider.start()
            self.tag_bar = tqdm(total=0, desc="tags", unit="tag", disable=show is False, position=0,
                                leave=True, dynamic_ncols=True)
        self.image_bar = tqdm(total=total, initial=total - len(pending), desc="images", unit="img",
                              disable=show is False, position=1 if self.tag_bar else 0, leave=True,
                              dynamic_ncols=True)
        workers = 2 * sum(self.config.endpoints[name].concurrency for name in self._used_endpoints())
        queue: asyncio.Queue = asyncio.Queue(maxsize=workers * 2)
        producer = asyncio.create_task(self._produce(pending, queue, workers))
        try:
            await asyncio.gather(producer, *(self._work(queue) for _ in range(workers)))
        finally:
            producer.cancel()
            for bar in (self.tag_bar, self.image_bar):
                if bar is not None:
                    bar.close()

    async def _produce(self, pending: List[ImageItem], queue: asyncio.Queue, workers: int) -> None:
        for item in pending:
            try:
                tags = await read_tags(item)
            except OSError as exc:
                tags = ImageFailed(f"cannot read tags file {item.tags_file}: {exc.strerror or exc}")
            if self.tag_provider and isinstance(tags, list):
                self.tag_provider.prefetch(tags)
            await queue.put((item, tags))
        for _ in range(workers):
            await queue.put(None)

    async def _work(self, queue: asyncio.Queue) -> None:
        while (job := await queue.get()) is not None:
            item, tags = job
            try:
                if isinstance(tags, ImageFailed):
                    raise tags
                await self._caption(item, tags)
                self.result.captioned += 1
            except (ImageFailed, ImageError, LLMError, TagSummaryError, OSError) as exc:
                self._fail(item, _reason(exc))
            self.image_bar.update(1)

    async def _caption(self, item: ImageItem, tags: List[str]) -> None:
        if not tags and not self.interrogator:
            raise ImageFailed(f"no tags ({item.path.stem}{self.config.tags_extension or ''} missing or empty) "
                              "and the Interrogator is off: nothing to caption from")
        summaries = await self.tag_provider.summaries(tags) if self.tag_provider else {}
        values = {"filename": item.path.name, "folder": item.rel.parent.as_posix(),
                  **tag_values(tags, summaries)}
        values["hints"] = await asyncio.to_thread(
            collect_hints, self.config.interrogator.hint_sources, HintInput(item.path, item.rel, tags))
        values["description"] = ""
        if self.interrogator:
            values["description"] = await self.interrogator.describe(item.path, values)
        caption = await self.interpreter.caption(values) if self.interpreter else values["description"]
        await asyncio.to_thread(write_caption, item, caption)

    def _fail(self, item: ImageItem, reason: str) -> None:
        self.result.failures.append(Failure(str(item.path), reason))
        log.error("failed: %s: %s", item.path, reason)

    def _tags_found(self, count: int) -> None:
        if self.tag_bar is not None:
            self.tag_bar.total += count
            self.tag_bar.refresh()

    def _tag_done(self) -> None:
        if self.tag_bar is not None:
            self.tag_bar.update(1)

    async def _close(self) -> None:
        if self.tag_provider:
            await self.tag_provider.close()
            self.result.tags = self.tag_provider.stats
            self.result.danbooru_requests = self.tag_provider.danbooru.requests
            self.result.danbooru_down = self.tag_provider.danbooru_down
        self.result.usage = dict(self.llm.usage)
        await self.llm.close()


class ImageFailed(Exception):
    pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ImageError):
        return f"image: {exc}"
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc)


def write_caption(item: ImageItem, caption: str) -> None:
    """Write the caption; first keep the tags it would replace (see dataset.py)."""
    if item.tags_backup is not None and not item.tags_backup.exists():
        original = item.caption_file.read_bytes() if item.caption_file.exists() else b""
        write_new_file(item.tags_backup, original)
    atomic_write_text(item.caption_file, caption)


async def run(config: Config, progress: Optional[bool] = None) -> RunResult:
    return await Run(config, progress).execute()
