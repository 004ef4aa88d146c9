"""Stage 1: one compact summary per distinct tag, from its wiki page, cached across runs.

Tags are resolved once per run whatever number of images use them: the first image to
need a tag starts its resolution, later images await the same task. Lookups are
gathered into batches (one Danbooru request answers up to `danbooru_batch_size` tags),
a tag is looked up only when the cache cannot answer, and summarised only when its page
has text and the tag will appear in captions.

An alias (`kitty` → `cat`, with `tags.resolve_aliases`) is resolved as its target: one
summary, under the target's name. With `tags.prune_implied`, what each tag implies is
asked too (batched the same way, kept in the cache), so that prompts can leave out the
parents a more specific tag implies. A tag source that cannot serve the run (a Cloudflare
challenge, no answer) is given up once; a Danbooru that did not answer is remembered in the
cache for `outage_minutes`, so the next run does not wait for it again.
"""
from __future__ import annotations

import asyncio
import fnmatch
import time
from dataclasses import dataclass, replace
from typing import Dict, Iterable, List, Optional, Set, Tuple

from tagcaption.config import Config, TagsConfig
from tagcaption.dtext import wiki_text_for_summary
from tagcaption.errors import ServerDown, SourceError, SourceUnreachable, TagSummaryError
from tagcaption.llm import LLM
from tagcaption.tag_batches import Batcher
from tagcaption.tag_cache import TagCache
from tagcaption.tag_names import NAMED_CATEGORIES, spelling
from tagcaption.tag_outages import SourceWatch
from tagcaption.tag_sources import TagInfo, make_source
from tagcaption.tagfiles import normalize_tag
from tagcaption.tag_summaries import Summariser
from tagcaption.tally import Tally

BATCH_WAIT = 0.05
"""Seconds a Danbooru batch waits for more tags before it is sent less than full."""


@dataclass
class TagKnowledge:
    """What the captions may use about one tag."""
    summary: Optional[str] = None
    category: Optional[str] = None
    post_count: Optional[int] = None
    known: bool = False
    alias_of: Optional[str] = None
    """The tag this one stands for (`tags.resolve_aliases`): prompts name that one instead."""
    implies: Optional[Tuple[str, ...]] = None
    """Every tag this one implies (None: not known)."""
    spelling: Optional[str] = None
    """How the wiki page's other names write the tag (`WLOP`), for `{artist_names}` and the like."""


class TagFilter:
    """Which tags reach the captions: `tags.exclude` names and wildcards, categories in
    `tags.exclude_categories`, and Danbooru tags with fewer posts than `min_post_count`
    (tags Danbooru does not know, like a LoRA trigger word, are always kept); and whether
    prompts resolve aliases and leave out implied tags. `omit`: `style.omit_traits_of`, the
    traits a character LoRA's trigger word stands for, left out like `tags.exclude`."""

    def __init__(self, tags: TagsConfig, min_post_count: int = 0, omit: Iterable[str] = ()):
        self.patterns = [pattern.strip().lower().replace(" ", "_") for pattern in tags.exclude] + \
            [normalize_tag(tag) for tag in omit]
        self.categories = set(tags.exclude_categories)
        self.min_post_count = min_post_count
        self.resolve_aliases = tags.resolve_aliases
        self.prune_implied = tags.prune_implied

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
        self.refresh = refresh
        self.summarise = summarise
        self.summariser = Summariser(config, llm, tally)
        self.filter = TagFilter(config.tags, self.settings.min_post_count, config.style.omit_traits_of)
        self.cache = cache if cache is not None else TagCache(config.path(self.settings.cache_file))
        self.source = source if source is not None else make_source(config, tally)
        self.origin: Optional[dict] = getattr(self.source, "origin", None)  # a stand-in source may have none
        self.watch = SourceWatch(self.settings, self.source.describe(), self.origin, tally)
        self.tally = tally
        self._tasks: Dict[str, asyncio.Task] = {}
        self._redirects: Dict[str, str] = {}
        self._in_company: Set[str] = set()
        self._implied: Dict[str, asyncio.Task] = {}
        slots = asyncio.Semaphore(max(1, self.settings.danbooru_concurrency))
        size = self.settings.danbooru_batch_size
        self._lookups = Batcher(self.source.lookup, size, slots, BATCH_WAIT, lambda name: TagInfo(name, known=False))
        ask = getattr(self.source, "implications", None) if config.tags.prune_implied else None
        self._implications = Batcher(ask, size, slots, BATCH_WAIT, lambda name: []) if ask else None

    def start(self) -> None:
        self.cache.load()
        self.watch.start(self.cache, self.refresh)

    def prefetch(self, tags: Iterable[str]) -> None:
        """Start resolving every tag of an image not seen yet in this run."""
        tags = list(tags)
        if len(tags) > 1:  # only a tag in company can make another one redundant
            self._in_company.update(tags)
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
        if self._implications is not None and len(tags) > 1:  # tags resolved when they were alone
            late = [tag for tag in tags if results[tag].implies is None]
            results.update(zip(late, await asyncio.gather(*(self._with_implications(tag, results[tag])
                                                            for tag in late))))
        return results

    async def _gather(self, tags: List[str]) -> Dict[str, object]:
        self.prefetch(tags)
        # Shielded: the tasks are shared with other images; cancelling this one must not stop them.
        results = await asyncio.gather(*(asyncio.shield(self._tasks[tag]) for tag in tags), return_exceptions=True)
        return dict(zip(tags, results))

    async def _resolve(self, tag: str, given: Optional[TagInfo] = None) -> TagKnowledge:
        """`given`: what a lookup of an alias already said about this tag, its target."""
        try:
            entry = None if self.refresh else self.cache.get(tag)
            if entry is not None and entry.get("alias_of") and not self.filter.resolve_aliases \
                    and not (entry.get("wiki") or entry.get("summary")):
                entry = None  # an alias cached as a pointer to its target: this run wants its text
            target = entry.get("alias_of") if entry is not None and self.filter.resolve_aliases else None
            if target and self._alias_is_fresh(entry) and self._may_redirect(tag, target):
                return await self._as_alias(tag, target)
            knowledge = await self._from_entry(tag, entry, given)
            return await self._with_implications(tag, knowledge)
        finally:
            self.tally.update("tags.resolved")

    async def _from_entry(self, tag: str, entry: Optional[dict], given: Optional[TagInfo]) -> TagKnowledge:
        if entry is not None and self.summariser.is_current(entry):
            self.tally.update("tags.cached")
            return _knowledge(entry)
        if entry is not None and entry.get("wiki"):
            return await self._summarise(tag, entry, again=True)
        if entry is not None and self._negative_is_fresh(entry):
            self.tally.update("tags.cached")
            return _knowledge(entry)
        return await self._look_up_and_summarise(tag, given)

    def _negative_is_fresh(self, entry: dict) -> bool:
        if entry.get("wiki") or entry.get("summary"):
            return False
        if "checked" not in entry:
            return True
        checked = entry["checked"]
        if not isinstance(checked, (int, float)) or isinstance(checked, bool):  # damaged: ask again
            return False
        return time.time() - float(checked) < self.settings.negative_ttl_days * 86400

    def _alias_is_fresh(self, entry: dict) -> bool:
        """An alias found by a lookup is asked again after `negative_ttl_days`, like a missing page
        (aliases change); one cached with its target's summary (before aliases were resolved) stays."""
        return bool(entry.get("summary") or entry.get("wiki")) or self._negative_is_fresh(entry)

    def _may_redirect(self, tag: str, target: str) -> bool:
        """Follow `tag` → `target` unless the target leads back (a cycle in damaged data would
        have each await the other)."""
        step = target
        while step != tag and step in self._redirects:
            step = self._redirects[step]
        if step == tag:
            return False
        self._redirects[tag] = target
        return True

    async def _as_alias(self, tag: str, target: str, given: Optional[TagInfo] = None) -> TagKnowledge:
        if tag in self._in_company:
            self._in_company.add(target)
        task = self._tasks.get(target)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            if task is None:
                self.tally.update("tags.found")
            task = self._tasks[target] = asyncio.create_task(self._resolve(target, given))
        self.tally.update("tags.aliased")
        return replace(await asyncio.shield(task), alias_of=target)

    async def _look_up_and_summarise(self, tag: str, given: Optional[TagInfo]) -> TagKnowledge:
        info = given or await self._lookup(tag)
        if info is None:
            return TagKnowledge()
        if info.alias_of and self.filter.resolve_aliases and self._may_redirect(tag, info.alias_of):
            self.cache.put(tag, self._stamped({"alias_of": info.alias_of, "known": True}))
            target = TagInfo(info.alias_of, info.category, info.post_count, info.wiki, other_names=info.other_names)
            return await self._as_alias(tag, info.alias_of, target)
        wiki = wiki_text_for_summary(info.wiki, self.settings.wiki_max_chars) if info.wiki else ""
        entry = self._stamped({"category": info.category, "post_count": info.post_count, "known": info.known,
                               "alias_of": info.alias_of, "wiki": wiki or None, "summary": None})
        written = spelling(tag, info.other_names) if info.category in NAMED_CATEGORIES else None
        if written:
            entry["spelling"] = written
        self._implications_of(tag, _knowledge(entry))  # asked beside the summary, batched with its batch
        if not wiki:
            self.tally.update("tags.no_wiki")
            self.cache.put(tag, entry)
            return _knowledge(entry)
        return await self._summarise(tag, entry)

    def _stamped(self, entry: dict) -> dict:
        """`entry` with when it was looked up and where its text comes from."""
        return dict(entry, checked=time.time(), **({"source": dict(self.origin)} if self.origin else {}))

    async def _lookup(self, tag: str) -> Optional[TagInfo]:
        """What the source says about `tag`; None (counted, and said once) when it cannot say."""
        if self.watch.down is None:
            try:
                return await self._lookups.get(tag)
            except SourceUnreachable as exc:
                self.watch.give_up(exc, self.cache)
            except SourceError as exc:
                self.watch.warn(f"warning: tag lookup failed: {exc}")
        self.watch.not_looked_up()
        return None

    def _implications_of(self, tag: str, knowledge: TagKnowledge) -> Optional[asyncio.Task]:
        """The request (started once) for what `tag` implies; None when nothing is to be asked."""
        if tag not in self._implied:
            if (self._implications is None or knowledge.implies is not None or not knowledge.known
                    or tag not in self._in_company or self.watch.down
                    or self.filter.excluded(tag, knowledge.category, knowledge)):
                return None
            self._implied[tag] = asyncio.ensure_future(self._implications.get(tag))
        return self._implied[tag]

    async def _with_implications(self, tag: str, knowledge: TagKnowledge) -> TagKnowledge:
        """`knowledge` with what the tag (or the tag it stands for) implies, when prompts prune
        implied tags; kept in the cache."""
        name = knowledge.alias_of or tag
        asking = self._implications_of(name, knowledge) if knowledge.implies is None else None
        if asking is None:
            return knowledge
        try:
            implies = await asyncio.shield(asking)
        except SourceUnreachable as exc:
            self.watch.give_up(exc, self.cache)
            return knowledge
        except SourceError as exc:
            self.watch.warn(f"warning: looking up what tags imply failed: {exc}")
            return knowledge
        entry = self.cache.get(name)
        if entry is not None and entry.get("implies") != list(implies):
            self.cache.put(name, dict(entry, implies=list(implies)))
        return replace(knowledge, implies=tuple(implies))

    async def _summarise(self, tag: str, entry: dict, again: bool = False) -> TagKnowledge:
        if self.filter.excluded(tag, entry.get("category"), _knowledge(entry)):
            self.tally.update("tags.excluded")
        elif not self.summarise:
            if not again:
                self.cache.put(tag, entry)
            return _knowledge(entry)
        else:
            entry = await self.summariser.summarise(tag, entry, again)
        self.cache.put(tag, entry)
        return _knowledge(entry)

    async def close(self) -> None:
        tasks = list(self._tasks.values()) + list(self._implied.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for batcher in (self._lookups, self._implications):
            if batcher is not None:
                await batcher.close()
        self.watch.note()
        await self.source.close()
        await self.cache.close()


def _knowledge(entry: dict) -> TagKnowledge:
    implies = entry.get("implies")
    return TagKnowledge(entry.get("summary"), entry.get("category"), entry.get("post_count"),
                        bool(entry.get("known", True)), implies=tuple(implies) if isinstance(implies, list) else None,
                        spelling=entry.get("spelling"))
