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
import html
import logging
import re
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

from tagcaption.config import Config, TagsConfig
from tagcaption.dataset import RATINGS, display_tag
from tagcaption.llm import LLM, LLMError, ServerDown
from tagcaption.tag_cache import TagCache
from tagcaption.tag_sources import SourceError, SourceUnreachable, TagInfo, make_source
from tagcaption.templates import Template

log = logging.getLogger("caption")

SUMMARY_PLACEHOLDERS = ("tag", "wiki")
CATEGORIES = ("general", "character", "copyright", "artist", "meta")
BATCH_WAIT = 0.05
"""Seconds a Danbooru batch waits for more tags before it is sent less than full."""


# --- DText -------------------------------------------------------------------------------

_LITERAL_BLOCKS = re.compile(
    r"\[nodtext\](.*?)\[/nodtext\]|<nodtext>(.*?)</nodtext>|\[code\](.*?)\[/code\]|<code>(.*?)</code>"
    r"|^```[^\n]*\n(.*?)\n```[ \t]*$",
    re.DOTALL | re.IGNORECASE | re.MULTILINE)
_WIKI_LINK = re.compile(r"\[\[([^\]|]+?)(?:\|([^\]]*))?\]\]")
_POST_SEARCH = re.compile(r"\{\{([^}|]+?)(?:\|([^}]*))?\}\}")
_QUOTED_LINK = re.compile(r'"([^"\n]+)":(?:\[[^\]\s]+\]|[a-z]+://[^\s<>"]*[^\s<>".,;:!?)\]])', re.IGNORECASE)
_MARKDOWN_LINK = re.compile(r"\[([^\]\n]+)\]\((?:[a-z]+://|/)[^)\s]*\)", re.IGNORECASE)
_URL_TAG = re.compile(r"\[url=[^\]]*\](.*?)\[/url\]", re.IGNORECASE | re.DOTALL)
_BARE_URL_TAG = re.compile(r"\[url\](.*?)\[/url\]", re.IGNORECASE | re.DOTALL)
_ANGLE_URL = re.compile(r"<([a-z]+://[^>\s]+)>", re.IGNORECASE)
_EMBED_LINE = re.compile(r"^[ \t]*!(?:post|asset) #\d+[^\n]*$", re.IGNORECASE | re.MULTILINE)
_HEADER = re.compile(r"^[ \t]*h([1-6])(?:#[\w-]+)?\.[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
_LIST_ITEM = re.compile(r"^[ \t]*(\*+)[ \t]+", re.MULTILINE)
_EXPAND_TITLE = re.compile(r"\[expand=([^\]]*)\]|<expand=([^>]*)>", re.IGNORECASE)
_TABLE_CELL_END = re.compile(r"\[/t[dh]\]|</t[dh]>", re.IGNORECASE)
_TABLE_ROW_END = re.compile(r"\[/tr\]|</tr>", re.IGNORECASE)
_BREAK = re.compile(r"\[br\]|<br\s*/?>|\[hr\]|<hr\s*/?>", re.IGNORECASE)
_BLOCK_TAGS = re.compile(r"\[/?(?:quote|expand|table)\]|</?(?:quote|expand|table)>",
                         re.IGNORECASE)
_TABLE_TAGS = re.compile(r"\[/?(?:thead|tbody|tr|td|th|col|colgroup)\]|</?(?:thead|tbody|tr|td|th|col|colgroup)>",
                         re.IGNORECASE)
_INLINE_TAGS = re.compile(r"\[/?(?:b|i|u|s|tn|sup|sub|center|spoilers?)\]"
                          r"|</?(?:b|strong|i|em|u|s|tn|sup|sub|spoilers?)>",
                          re.IGNORECASE)


def _link_text(target: str, shown: Optional[str]) -> str:
    target = target.strip()
    if shown is None:
        return target.split("#", 1)[0].replace("_", " ").strip()
    if shown.strip():
        return shown.strip()
    # The pipe trick: "[[Kaga (Kantai Collection)|]]" shows "Kaga".
    return re.sub(r"\s*\([^)]*\)\s*$", "", target.split("#", 1)[0]).replace("_", " ").strip()


def _clean_line(line: str) -> str:
    indent = re.match(r"[ \t]*", line).group() if re.match(r"[ \t]*- ", line) else ""
    return indent + re.sub(r"[ \t]+", " ", line).strip().rstrip("|").strip()


def dtext_to_text(body: str) -> str:
    """Danbooru DText as the plain text a reader of the rendered page sees, without markup."""
    literals: List[str] = []

    def keep_literal(match: re.Match) -> str:
        literals.append(next(group for group in match.groups() if group is not None))
        return f"\x00{len(literals) - 1}\x00"

    text = body.replace("\r\n", "\n")
    text = _LITERAL_BLOCKS.sub(keep_literal, text)
    text = _EMBED_LINE.sub("", text)
    text = _WIKI_LINK.sub(lambda m: _link_text(m.group(1), m.group(2)), text)
    text = _POST_SEARCH.sub(lambda m: (m.group(2) or m.group(1).replace("_", " ")).strip(), text)
    text = _URL_TAG.sub(r"\1", text)
    text = _BARE_URL_TAG.sub(r"\1", text)
    text = _QUOTED_LINK.sub(r"\1", text)
    text = _MARKDOWN_LINK.sub(r"\1", text)
    text = _ANGLE_URL.sub(r"\1", text)
    text = _HEADER.sub(lambda m: m.group(2).strip(), text)
    text = _LIST_ITEM.sub(lambda m: "  " * (len(m.group(1)) - 1) + "- ", text)
    text = _EXPAND_TITLE.sub(lambda m: (m.group(1) or m.group(2) or "").strip() + "\n", text)
    text = _TABLE_CELL_END.sub(" | ", text)
    text = _TABLE_ROW_END.sub("\n", text)
    text = _BREAK.sub("\n", text)
    text = _BLOCK_TAGS.sub("\n", text)
    text = _TABLE_TAGS.sub("", text)
    text = _INLINE_TAGS.sub("", text)
    text = html.unescape(text)
    text = re.sub(r"\x00(\d+)\x00", lambda m: literals[int(m.group(1))], text)
    lines = [_clean_line(line) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_SECTION_HEADER = re.compile(r"^[ \t]*h[1-6](?:#[\w-]+)?\.[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
_NOISE_SECTIONS = re.compile(r"^(see also|external links?|links|related tags?|related|tag groups?|"
                             r"references?|sources?|notes? for taggers|tagging notes?)\b", re.IGNORECASE)
_LINK_ONLY_ITEM = re.compile(r"^[ \t]*\*+[ \t]*(?:\[\[[^\]]*\]\][ \t,;/]*|\{\{[^}]*\}\}[ \t,;/]*)+(?:\n|\Z)", re.MULTILINE)


def wiki_text_for_summary(body: str, max_chars: int = 1500) -> str:
    """The part of a wiki page that says what the tag means, as plain text, at most
    `max_chars` long: "See also", "External links" and tag-group sections, and list items
    that are nothing but links to other tags, are left out."""
    kept, skipping, position = [], False, 0
    for header in _SECTION_HEADER.finditer(body):
        if not skipping:
            kept.append(body[position:header.start()])
        skipping = bool(_NOISE_SECTIONS.match(header.group(1).strip()))
        position = header.start()
    if not skipping:
        kept.append(body[position:])
    text = dtext_to_text(_LINK_ONLY_ITEM.sub("", "".join(kept)))
    if max_chars and len(text) > max_chars:
        cut = text[:max_chars]
        boundary = max(cut.rfind(". "), cut.rfind("\n"))
        text = (cut[:boundary + 1] if boundary > max_chars // 2 else cut).rstrip()
    return text


# --- The stage -----------------------------------------------------------------------------


class TagSummaryError(Exception):
    pass


@dataclass
class TagKnowledge:
    """What the captions may use about one tag."""
    summary: Optional[str] = None
    category: Optional[str] = None
    post_count: Optional[int] = None
    known: bool = False


@dataclass
class TagStats:
    summarised: int = 0
    resummarised: int = 0
    cached: int = 0
    no_wiki: int = 0
    excluded: int = 0
    refused: int = 0
    lookup_failed: int = 0
    failed: int = 0


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
    def __init__(self, config: Config, llm: LLM, on_tag_done: Callable[[], None] = lambda: None,
                 on_tags_found: Callable[[int], None] = lambda n: None, refresh: bool = False):
        self.settings = config.tag_provider
        self.llm = llm
        self.refresh = refresh
        self.template = Template.load(config.resource(self.settings.prompt_template), SUMMARY_PLACEHOLDERS)
        self.template_hash = hashlib.sha1(
            f"{self.settings.system_prompt}\x00{self.template.render(tag=chr(1), wiki=chr(2))}".encode()).hexdigest()[:12]
        self.filter = TagFilter(config.tags, self.settings.min_post_count)
        self.cache = TagCache(config.path(self.settings.cache_file))
        self.source = make_source(config)
        self.stats = TagStats()
        self.source_down: Optional[str] = None
        self._warned: set = set()
        self._tasks: Dict[str, asyncio.Task] = {}
        self._waiting: Dict[str, asyncio.Future] = {}
        self._wake = asyncio.Event()
        self._batch_full = asyncio.Event()
        self._lookup_slots = asyncio.Semaphore(max(1, self.settings.danbooru_concurrency))
        self._dispatcher: Optional[asyncio.Task] = None
        self._lookups: set = set()
        self._on_tag_done = on_tag_done
        self._on_tags_found = on_tags_found

    @property
    def source_requests(self) -> int:
        return self.source.requests

    def start(self) -> None:
        self.cache.load()

    def prefetch(self, tags: Iterable[str]) -> None:
        """Start resolving every tag not seen yet in this run."""
        new = [tag for tag in tags if tag not in self._tasks]
        for tag in new:
            self._tasks[tag] = asyncio.create_task(self._resolve(tag))
        if new:
            self._on_tags_found(len(new))

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
                self.stats.cached += 1
                return _knowledge(entry)
            if entry is not None and entry.get("wiki"):
                return await self._summarise(tag, entry, resummarise=True)
            if entry is not None and self._negative_is_fresh(entry):
                self.stats.cached += 1
                return _knowledge(entry)
            return await self._look_up_and_summarise(tag)
        finally:
            self._on_tag_done()

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
            self.stats.lookup_failed += 1
            return TagKnowledge()
        try:
            info = await self._lookup(tag)
        except SourceUnreachable as exc:
            self.stats.lookup_failed += 1
            if not self.source_down:
                self.source_down = str(exc)
                log.warning("warning: %s; captioning goes on without tag summaries", exc)
            return TagKnowledge()
        except SourceError as exc:
            self.stats.lookup_failed += 1
            if str(exc) not in self._warned:
                self._warned.add(str(exc))
                log.warning("warning: tag lookup failed: %s", exc)
            return TagKnowledge()
        wiki = wiki_text_for_summary(info.wiki, self.settings.wiki_max_chars) if info.wiki else ""
        entry = {"category": info.category, "post_count": info.post_count, "known": info.known,
                 "alias_of": info.alias_of, "wiki": wiki or None, "summary": None, "checked": time.time()}
        if not wiki:
            self.stats.no_wiki += 1
            self.cache.put(tag, entry)
            return _knowledge(entry)
        return await self._summarise(tag, entry)

    async def _summarise(self, tag: str, entry: dict, resummarise: bool = False) -> TagKnowledge:
        knowledge = _knowledge(entry)
        if self.filter.excluded(tag, knowledge.category, knowledge):
            self.stats.excluded += 1
            self.cache.put(tag, entry)
            return knowledge
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        messages.append({"role": "user", "content": self.template.render(tag=tag.replace("_", " "),
                                                                         wiki=entry["wiki"])})
        try:
            summary = " ".join((await self.llm.complete("tag_provider", self.settings, messages)).split())
        except LLMError as exc:
            if not exc.record_kind.startswith("guard_"):
                self.stats.failed += 1
                raise
            # A summary the model refused (or that tripped another guard) is no summary; remembered
            # for this model and template so that reruns do not ask again.
            self.stats.refused += 1
            log.warning("warning: tag '%s' has no summary: %s", tag, exc)
            self.cache.put(tag, dict(entry, summary=None, refused=str(exc), model=self.settings.model,
                                     template=self.template_hash))
            return knowledge
        if resummarise:
            self.stats.resummarised += 1
        else:
            self.stats.summarised += 1
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


def tag_variables(tags: List[str], knowledge: Dict[str, TagKnowledge], categories: Dict[str, str],
                  rating: Optional[str], tag_filter: TagFilter) -> Dict[str, str]:
    """The template variables made from an image's tags, after exclusions.

    `categories` are those the image's sidecar gives (they win over the source's)."""
    kept: List[tuple] = []
    for tag in tags:
        info = knowledge.get(tag)
        category = categories.get(tag) or (info.category if info else None) or "general"
        if not tag_filter.excluded(tag, category, info):
            kept.append((tag, category, info.summary if info else None))
    values = {
        "tags": ", ".join(display_tag(tag) for tag, _, _ in kept),
        "booru_tags": ", ".join(tag for tag, _, _ in kept),
        "tag_descriptions": "\n".join(f"{display_tag(tag)}: {summary}" for tag, _, summary in kept if summary),
        "rating": RATINGS.get((rating or "").lower()[:1], rating or "") if rating else "",
    }
    for name in CATEGORIES:
        values[f"{name}_tags"] = ", ".join(display_tag(tag) for tag, category, _ in kept if category == name)
    return values


TAG_VARIABLES = ("tags", "booru_tags", "tag_descriptions", "rating") + tuple(f"{name}_tags" for name in CATEGORIES)
