"""Stage 1: one compact summary per distinct tag, from its Danbooru wiki page, cached forever.

Tags are resolved once per run whatever number of images use them: the first image to
need a tag starts its lookup, later images await the same task. A tag is looked up on
Danbooru only when it is not in the cache, and summarised only when its page has text.
"""
from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional
from urllib.parse import quote

import httpx2  # installed by openai; its async client keeps Danbooru lookups on the event loop

from config import Config, ConfigError, TagProviderConfig
from files import atomic_write_text
from llm import LLM, LLMError, is_loopback
from templates import Template
from version import USER_AGENT

log = logging.getLogger("caption")

SUMMARY_PLACEHOLDERS = ("tag", "wiki")


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


# --- Danbooru ------------------------------------------------------------------------------


class DanbooruError(Exception):
    """Danbooru could not answer this lookup; str() is one line for the user."""


class DanbooruUnreachable(DanbooruError):
    pass


def wiki_title(tag: str) -> str:
    """The title used in `/wiki_pages/<title>.json`; all-digit titles need a `~` prefix."""
    return f"~{tag}" if tag.isdigit() else tag


class Danbooru:
    def __init__(self, config: TagProviderConfig):
        self.base_url = config.danbooru_url.rstrip("/")
        self.http = httpx2.AsyncClient(
            base_url=self.base_url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            timeout=config.danbooru_timeout, trust_env=not is_loopback(self.base_url), follow_redirects=True)
        self.slots = asyncio.Semaphore(config.danbooru_concurrency)
        self.requests = 0

    async def _get(self, path: str, params: Optional[dict] = None):
        async with self.slots:
            self.requests += 1
            try:
                response = await self.http.get(path, params=params)
            except httpx2.TransportError as exc:
                raise DanbooruUnreachable(f"cannot reach Danbooru at {self.base_url} "
                                          f"({type(exc).__name__}: {exc or 'no detail'})") from None
        if response.status_code == 404:
            return None
        content_type = response.headers.get("content-type", "")
        if response.status_code != 200 or "json" not in content_type:
            kind = "an HTML page" if "html" in content_type else f"'{content_type or 'no content type'}'"
            hint = (" (likely Cloudflare blocking this client; try again later or set login/api_key)"
                    if response.status_code == 403 else "")
            raise DanbooruError(f"Danbooru answered HTTP {response.status_code} with {kind} for {path}{hint}")
        try:
            return response.json()
        except ValueError:
            raise DanbooruError(f"Danbooru sent malformed JSON for {path}") from None

    async def wiki_body(self, tag: str) -> Optional[str]:
        """The DText body of the tag's wiki page, or None when it has none (or it was deleted)."""
        page = await self._get(f"/wiki_pages/{quote(wiki_title(tag), safe='')}.json")
        if not isinstance(page, dict) or page.get("is_deleted"):
            return None
        return page.get("body") or None

    async def post_count(self, tag: str) -> int:
        found = await self._get("/tags.json", {"search[name]": tag, "only": "name,post_count"})
        for entry in found or ():
            if entry.get("name") == tag:
                return int(entry.get("post_count") or 0)
        return 0

    async def close(self) -> None:
        await self.http.aclose()


# --- Cache ---------------------------------------------------------------------------------


class TagCache:
    """`tags_cache.json`: read once, then rewritten atomically (at most once a second) as
    summaries arrive, so a crash loses at most the last second's work and never the file."""

    FLUSH_INTERVAL = 1.0

    def __init__(self, path: Path):
        self.path = path
        self.entries: Dict[str, dict] = {}
        self._dirty = False
        self._last_flush = 0.0
        self._flushing: Optional[asyncio.Task] = None

    def load(self) -> None:
        """Read the cache; a damaged one is moved aside (never silently emptied)."""
        folder = self.path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"tag_provider.cache_file: cannot write to the folder {folder}")
        if not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            tags = data.get("tags", data) if isinstance(data, dict) else None
            if not isinstance(tags, dict):
                raise ValueError("not a JSON object of tags")
        except OSError as exc:
            raise ConfigError(f"cannot read tag cache {self.path}: {exc.strerror or exc}") from None
        except (ValueError, UnicodeDecodeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(aside)
            log.warning("warning: tag cache %s is damaged (%s); moved it to %s and starting empty",
                        self.path, _first_line(exc), aside.name)
            return
        for name, entry in tags.items():
            if isinstance(entry, str):  # a plain {"tag": "summary"} cache from the original script
                entry = {"summary": entry}
            if isinstance(entry, dict):
                self.entries[name] = entry

    def get(self, tag: str) -> Optional[dict]:
        return self.entries.get(tag)

    def put(self, tag: str, entry: dict) -> None:
        self.entries[tag] = entry
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.FLUSH_INTERVAL and not self._flushing:
            self._flushing = asyncio.create_task(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        try:
            await self.flush()
        finally:
            self._flushing = None

    async def flush(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        self._last_flush = time.monotonic()
        text = json.dumps({"version": 1, "tags": self.entries}, ensure_ascii=False, indent=1, sort_keys=True)
        try:
            await asyncio.to_thread(atomic_write_text, self.path, text + "\n")
        except OSError as exc:
            self._dirty = True
            log.warning("warning: cannot save tag cache %s: %s", self.path, exc.strerror or exc)

    async def close(self) -> None:
        if self._flushing:
            await self._flushing
        await self.flush()


def _first_line(value: object) -> str:
    text = str(value).strip()
    return text.splitlines()[0] if text else type(value).__name__


# --- The stage -----------------------------------------------------------------------------


class TagSummaryError(Exception):
    pass


@dataclass
class TagStats:
    summarised: int = 0
    cached: int = 0
    no_wiki: int = 0
    rare: int = 0
    lookup_failed: int = 0
    failed: int = 0


class TagProvider:
    def __init__(self, config: Config, llm: LLM, on_tag_done: Callable[[], None] = lambda: None,
                 on_tags_found: Callable[[int], None] = lambda n: None):
        self.settings = config.tag_provider
        self.llm = llm
        self.template = Template.load(config.resource(self.settings.prompt_template), SUMMARY_PLACEHOLDERS)
        self.template_hash = hashlib.sha1(self.template.render(tag="\x00", wiki="\x00").encode()).hexdigest()[:12]
        self.cache = TagCache(config.path(self.settings.cache_file))
        self.danbooru = Danbooru(self.settings)
        self.stats = TagStats()
        self.danbooru_down: Optional[str] = None
        self.lookup_errors: Dict[str, int] = {}
        self._tasks: Dict[str, asyncio.Task] = {}
        self._on_tag_done = on_tag_done
        self._on_tags_found = on_tags_found

    def start(self) -> None:
        self.cache.load()

    def prefetch(self, tags: Iterable[str]) -> None:
        """Start resolving every tag not seen yet in this run (bounded by the endpoint's slots)."""
        new = [tag for tag in tags if tag not in self._tasks]
        for tag in new:
            self._tasks[tag] = asyncio.create_task(self._resolve(tag))
        if new:
            self._on_tags_found(len(new))

    async def summaries(self, tags: List[str]) -> Dict[str, Optional[str]]:
        """Each tag's summary (None when it has none); raises TagSummaryError if one failed."""
        self.prefetch(tags)
        # Shielded: the tasks are shared with other images, and cancelling this one must not stop them.
        results = await asyncio.gather(*(asyncio.shield(self._tasks[tag]) for tag in tags), return_exceptions=True)
        for tag, result in zip(tags, results):
            if isinstance(result, BaseException):
                raise TagSummaryError(f"summary of tag '{tag}' failed: {result}")
        return dict(zip(tags, results))

    async def _resolve(self, tag: str) -> Optional[str]:
        try:
            cached = self.cache.get(tag)
            if cached is not None:
                self.stats.cached += 1
                return cached.get("summary")
            return await self._summarise(tag)
        finally:
            self._on_tag_done()

    async def _summarise(self, tag: str) -> Optional[str]:
        body = await self._lookup(tag)
        if body is None:
            return None
        wiki = dtext_to_text(body)
        if not wiki:
            self.stats.no_wiki += 1
            self.cache.put(tag, self._entry(None, "empty wiki page"))
            return None
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        messages.append({"role": "user", "content": self.template.render(tag=tag.replace("_", " "), wiki=wiki)})
        try:
            summary = " ".join((await self.llm.complete("tag_provider", self.settings, messages)).split())
        except LLMError:
            self.stats.failed += 1
            raise
        self.stats.summarised += 1
        self.cache.put(tag, self._entry(summary, wiki_sha1=hashlib.sha1(wiki.encode()).hexdigest()))
        return summary

    async def _lookup(self, tag: str) -> Optional[str]:
        """The wiki body to summarise, or None (cached as such when the answer is definite)."""
        if self.danbooru_down:
            self.stats.lookup_failed += 1
            return None
        try:
            if self.settings.min_post_count > 0:
                count = await self.danbooru.post_count(tag)
                if count < self.settings.min_post_count:
                    self.stats.rare += 1
                    self.cache.put(tag, self._entry(None, f"{count} posts, below min_post_count"))
                    return None
            body = await self.danbooru.wiki_body(tag)
        except DanbooruUnreachable as exc:
            self.stats.lookup_failed += 1
            if not self.danbooru_down:
                self.danbooru_down = str(exc)
                log.warning("warning: %s; captioning goes on without tag summaries", exc)
            return None
        except DanbooruError as exc:
            self.stats.lookup_failed += 1
            if str(exc) not in self.lookup_errors:
                log.warning("warning: tag '%s': %s", tag, exc)
            self.lookup_errors[str(exc)] = self.lookup_errors.get(str(exc), 0) + 1
            return None
        if body is None:
            self.stats.no_wiki += 1
            self.cache.put(tag, self._entry(None, "no wiki page"))
        return body

    def _entry(self, summary: Optional[str], reason: str = "", wiki_sha1: str = "") -> dict:
        entry = {"summary": summary, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if summary is None:
            entry["reason"] = reason
        else:
            entry.update(model=self.settings.model, template=self.template_hash, wiki_sha1=wiki_sha1)
        return entry

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        await self.danbooru.close()
        await self.cache.close()
