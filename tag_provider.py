"""Stage 1: one compact summary per distinct tag, from its wiki page, cached across runs.

Tags are resolved once per run whatever number of images use them: the first image to
need a tag starts its resolution, later images await the same task. Lookups are
gathered into batches (one Danbooru request answers up to `danbooru_batch_size` tags),
a tag is looked up only when the cache cannot answer, and summarised only when its page
has text and the tag will appear in captions.
"""
from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

from tagcaption.config import Config, TagsConfig
from tagcaption.dtext import wiki_text_for_summary
from tagcaption.errors import GuardTripped, LLMError, ServerDown, SourceError, SourceUnreachable, TagSummaryError
from tagcaption.llm import LLM
from tagcaption.placeholders import SUMMARY_PLACEHOLDERS
from tagcaption.tag_cache import TagCache
from tagcaption.tag_sources import TagInfo, make_source
from tagcaption.tally import Tally
from tagcaption.templates import Template
from tagcaption.vocabulary import TAG_PROVIDER

log = logging.getLogger("caption")

BATCH_WAIT = 0.05
"""Seconds a Danbooru batch waits for more tags before it is sent less than full."""


@dataclass
class TagKnowledge:
    """What the captions may use about one tag."""
    summary: Optional[str] = None
    category: Optional[str] = None
    post_count: Optional[int] = None
    known: bool = False


class TagFilter:
    """Which tags reach the captions: `tags.exclude` names and wildcards, categories in
    `tags.exclude_categories`, and Danbooru tags with fewer posts than `min_post_count`
    (tags Danbooru does not know, like a LoRA trigger word, are always kept)."""

    def __init__(self, tags: TagsConfig, min_post_count: int = 0):
        self.patterns = [pattern.strip().lower().replace(" ", "_") for pattern in tags.exclude]
        self.categories = set(tags.exclude_categories)
        self.min_post_count = min_post_count

    def excluded_by_name(self, tag: str) -> bool:
        return any(fnmatch.fnmatchcase(tag, pattern) for pattern in self.patterns)

    def excluded(self, tag: str, category: Optional[str], knowledge: Optional[TagKnowledge] = None) -> bool:
        if self.excluded_by_name(tag) or (category in self.categories):
            return True
        return bool(knowledge and knowledge.known and self.min_post_count
                    and (knowledge.post_count or 0) < self.min_post_count)


class TagProvider:
    def __init__(self, config: Config, llm: LLM, tally: Tally, *, refresh: bool = False, source=None,
                 cache: Optional[TagCache] = None, summarise: bool = True):
        """Counts go to `tally` (`tags.…`, `danbooru.requests`, the note `danbooru.down`);
        `source` and `cache` replace the configured tag source and cache file (a dry run passes
        a stand-in source and a read-only cache). Without `summarise` (no prompt uses
        `{tag_descriptions}`), tags are looked up for their categories and post counts only."""
        self.settings = config.tag_provider
        self.llm = llm
        self.refresh = refresh
        self.summarise = summarise
        self.template = Template.load(config.resource(self.settings.prompt_template), SUMMARY_PLACEHOLDERS)
        self.template_hash = hashlib.sha1(
            f"{self.settings.system_prompt}\x00{self.template.render(tag=chr(1), wiki=chr(2))}".encode()).hexdigest()[:12]
        self.filter = TagFilter(config.tags, self.settings.min_post_count)
        self.cache = cache if cache is not None else TagCache(config.path(self.settings.cache_file))
        self.source = source if source is not None else make_source(config, tally)
        self.tally = tally
        self.source_down: Optional[str] = None
        self._warned: set = set()
        self._tasks: Dict[str, asyncio.Task] = {}
        self._waiting: Dict[str, asyncio.Future] = {}
        self._wake = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._lookup_slots = asyncio.Semaphore(max(1, self.settings.danbooru_concurrency))
        self._dispatcher: Optional[asyncio.Task] = None
        self._lookups: set = set()

    def start(self) -> None:
        self.cache.load()

    def prefetch(self, tags: Iterable[str]) -> None:
        """Start resolving every tag not seen yet in this run."""
        new = [tag for tag in tags if tag not in self._tasks]
        for tag in new:
            self._tasks[tag] = asyncio.create_task(self._resolve(tag))
        if new:
            self.tally.update("tags.found", len(new))

    async def knowledge(self, tags: List[str]) -> Dict[str, TagKnowledge]:
        """Each tag's knowledge; raises TagSummaryError if a summary the caption needs failed
        twice (a failed tag is tried once more, by a task the waiting images share)."""
        results = await self._gather(tags)
        failed = [tag for tag in tags if isinstance(results[tag], BaseException)]
        for tag in failed:
            if isinstance(results[tag], ServerDown):
                raise results[tag]
            if self._tasks.get(tag) is not None and self._tasks[tag].done():
                del self._tasks[tag]
        if failed:
            results.update(await self._gather(failed))
        for tag in failed:
            if isinstance(results[tag], ServerDown):
                raise results[tag]
            if isinstance(results[tag], BaseException):
                raise TagSummaryError(f"summary of tag '{tag}' failed: {results[tag]}")
        return results

    async def _gather(self, tags: List[str]) -> Dict[str, object]:
        self.prefetch(tags)
        # Shielded: the tasks are shared with other images; cancelling this one must not stop them.
        results = await asyncio.gather(*(asyncio.shield(self._tasks[tag]) for tag in tags), return_exceptions=True)
        return dict(zip(tags, results))

    async def _resolve(self, tag: str) -> TagKnowledge:
        try:
            entry = None if self.refresh else self.cache.get(tag)
            if entry is not None and self._summary_is_current(entry):
                self._count("cached")
                return _knowledge(entry)
            if entry is not None and entry.get("wiki"):
                return await self._summarise(tag, entry, resummarise=True)
            if entry is not None and self._negative_is_fresh(entry):
                self._count("cached")
                return _knowledge(entry)
            return await self._look_up_and_summarise(tag)
        finally:
            self.tally.update("tags.resolved")

    def _count(self, outcome: str) -> None:
        self.tally.update(f"tags.{outcome}")

    def _summary_is_current(self, entry: dict) -> bool:
        if entry.get("refused"):
            return entry.get("model") == self.settings.model and entry.get("template") == self.template_hash
        if not entry.get("summary"):
            return False
        if "model" not in entry:  # from the original script's cache: keep it
            return True
        return entry.get("model") == self.settings.model and entry.get("template") == self.template_hash

    def _negative_is_fresh(self, entry: dict) -> bool:
        if entry.get("wiki") or entry.get("summary"):
            return False
        if "checked" not in entry:
            return True
        return time.time() - float(entry["checked"]) < self.settings.negative_ttl_days * 86400

    async def _look_up_and_summarise(self, tag: str) -> TagKnowledge:
        if self.source_down:
            self._count("lookup_failed")
            return TagKnowledge()
        try:
            info = await self._lookup(tag)
        except SourceUnreachable as exc:
            self._count("lookup_failed")
            if not self.source_down:
                self.source_down = str(exc)
                self.tally.note("danbooru.down", str(exc))
                log.warning("warning: %s; captioning goes on without tag summaries", exc)
            return TagKnowledge()
        except SourceError as exc:
            self._count("lookup_failed")
            if str(exc) not in self._warned:
                self._warned.add(str(exc))
                log.warning("warning: tag lookup failed: %s", exc)
            return TagKnowledge()
        wiki = wiki_text_for_summary(info.wiki, self.settings.wiki_max_chars) if info.wiki else ""
        entry = {"category": info.category, "post_count": info.post_count, "known": info.known,
                 "alias_of": info.alias_of, "wiki": wiki or None, "summary": None, "checked": time.time()}
        if not wiki:
            self._count("no_wiki")
            self.cache.put(tag, entry)
            return _knowledge(entry)
        return await self._summarise(tag, entry)

    async def _summarise(self, tag: str, entry: dict, resummarise: bool = False) -> TagKnowledge:
        knowledge = _knowledge(entry)
        if self.filter.excluded(tag, knowledge.category, knowledge):
            self._count("excluded")
            self.cache.put(tag, entry)
            return knowledge
        if not self.summarise:
            if not resummarise:
                self.cache.put(tag, entry)
            return knowledge
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        messages.append({"role": "user", "content": self.template.render(tag=tag.replace("_", " "),
                                                                         wiki=entry["wiki"])})
        try:
            summary = " ".join((await self.llm.complete(TAG_PROVIDER, self.settings, messages)).split())
        except LLMError as exc:
            if not isinstance(exc, GuardTripped):
                self._count("failed")
                raise
            # A summary the model refused (or that tripped another guard) is no summary; remembered
            # for this model and template so that reruns do not ask again.
            self._count("refused")
            log.warning("warning: tag '%s' has no summary: %s", tag, exc, extra={
                "group": "no_summary", "item": tag, "summary": "warning: {count} tags have no summary (the model's "
                "replies tripped a guard; they are marked refused in the tag cache)"})
            self.cache.put(tag, dict(entry, summary=None, refused=str(exc), model=self.settings.model,
                                     template=self.template_hash))
            return knowledge
        self._count("resummarised" if resummarise else "summarised")
        entry = dict(entry, summary=summary, model=self.settings.model, template=self.template_hash,
                     created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
        self.cache.put(tag, entry)
        return _knowledge(entry)

    # --- batched lookups ---------------------------------------------------------------

    async def _lookup(self, tag: str) -> TagInfo:
        future = asyncio.get_running_loop().create_future()
        self._waiting[tag] = future
        self._wake.set()
        if len(self._waiting) >= self.settings.danbooru_batch_size:
            self._batch_full.set()
        if self._dispatcher is None:
            self._dispatcher = asyncio.create_task(self._dispatch())
        return await future

    async def _dispatch(self) -> None:
        """Send waiting tags in batches; while all lookup slots are busy, tags pile up into
        the next batch, so U tags cost about U / batch size requests."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                await self._lookup_slots.acquire()
                await self._until_batch_full(BATCH_WAIT)
                names = list(self._waiting)[: self.settings.danbooru_batch_size]
                batch = {name: self._waiting.pop(name) for name in names}
                task = asyncio.create_task(self._lookup_batch(batch))
                self._lookups.add(task)
                task.add_done_callback(self._lookups.discard)

    async def _until_batch_full(self, seconds: float) -> None:
        """Let the tags of images read just now join this batch, for at most `seconds`."""
        if len(self._waiting) < self.settings.danbooru_batch_size:
            try:
                await asyncio.wait_for(self._batch_full.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        self._batch_full.clear()

    async def _lookup_batch(self, batch: Dict[str, asyncio.Future]) -> None:
        try:
            found = await self.source.lookup(list(batch))
        except Exception as exc:  # handed to every tag of the batch, each image decides
            for future in batch.values():
                if not future.done():
                    future.set_exception(exc)
        else:
            for name, future in batch.items():
                if not future.done():
                    future.set_result(found.get(name) or TagInfo(name, known=False))
        finally:
            self._lookup_slots.release()

    async def close(self) -> None:
        tasks = list(self._tasks.values()) + list(self._lookups)
        if self._dispatcher:
            tasks.append(self._dispatcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.source.close()
        await self.cache.close()


def _knowledge(entry: dict) -> TagKnowledge:
    return TagKnowledge(entry.get("summary"), entry.get("category"), entry.get("post_count"),
                        bool(entry.get("known", True)))
