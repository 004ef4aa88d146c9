"""Where tag knowledge comes from: Danbooru's API, a local wiki dump, or nowhere.

A source answers `lookup(names)` with, for each tag, its category, post count, the tag
it is an alias of, and its wiki page's DText body (None when it has none). Danbooru is
asked many tags at a time (`/tags.json` with `search[name_comma]` and the wiki page
nested through `only=`), politely: a User-Agent naming this program, a request rate
limit, and retries as `retry.RetryPolicy` says (408, 409, 429, 5xx, timeouts and connection
errors, honouring Retry-After).
"""
from __future__ import annotations

import asyncio
import csv
import gzip
import io
import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional

import httpx2  # installed by openai; its async client keeps Danbooru lookups on the event loop

from tagcaption import tls
from tagcaption.config import Config, TagProviderConfig
from tagcaption.endpoint import is_loopback
from tagcaption.errors import ConfigError, Kind, SourceError, SourceUnreachable
from tagcaption.retry import RetryPolicy, is_retryable, parse_retry_after
from tagcaption.sinks import register_secret
from tagcaption.tally import Tally
from tagcaption.version import USER_AGENT

__all__ = ["TagInfo", "SourceError", "SourceUnreachable", "DanbooruSource", "FileSource", "NoSource",
           "make_source", "normalize_title", "CATEGORY_NAMES"]

CATEGORY_NAMES = {0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta"}
MAX_URL_CHARS = 3000


@dataclass
class TagInfo:
    name: str
    category: Optional[str] = None
    post_count: Optional[int] = None
    wiki: Optional[str] = None
    """The wiki page's DText body; None when there is none (or it was deleted)."""
    alias_of: Optional[str] = None
    known: bool = True
    """False when the source has never heard of the tag (a custom trigger word, a typo)."""


def normalize_title(title: str) -> str:
    """Danbooru's normalize_title: lowercase, no leading `~`, whitespace runs as one `_`."""
    title = "_".join(title.strip().lower().lstrip("~").split())
    while "__" in title:
        title = title.replace("__", "_")
    return title.strip("_")


class DanbooruSource:
    def __init__(self, settings: TagProviderConfig, tally: Optional[Tally] = None):
        self.settings = settings
        self.base_url = settings.danbooru_url.rstrip("/")
        self.policy = RetryPolicy(settings.danbooru_retries, 0.5, 30.0)
        self.tally = tally if tally is not None else Tally()
        auth = None
        if settings.login and settings.api_key:
            register_secret(settings.api_key, login=settings.login)
            auth = (settings.login, settings.api_key)
        self.http = httpx2.AsyncClient(
            base_url=self.base_url, headers={"User-Agent": USER_AGENT, "Accept": "application/json"},
            timeout=settings.danbooru_timeout, trust_env=not is_loopback(self.base_url), follow_redirects=True,
            auth=auth, verify=tls.context_for(self.base_url))
        self.slots = asyncio.Semaphore(settings.danbooru_concurrency)
        self._next_start = 0.0
        self._pace = asyncio.Lock()

    def describe(self) -> str:
        return f"Danbooru at {self.base_url}"

    async def lookup(self, names: List[str]) -> Dict[str, TagInfo]:
        """Everything known about `names`, in ⌈len / batch⌉ requests plus alias lookups."""
        found: Dict[str, TagInfo] = {}
        for batch in self._batches(names):
            found.update(await self._tags(batch))
        # An aliased tag may still exist on Danbooru, emptied: check those too.
        missing = [name for name in names if name not in found or (not found[name].post_count
                                                                   and not found[name].wiki)]
        aliases: Dict[str, str] = {}
        for batch in self._batches(missing):
            aliases.update(await self._aliases(batch))
        targets = sorted(set(aliases.values()) - set(found))
        for batch in self._batches(targets):
            found.update(await self._tags(batch))
        result = {}
        for name in names:
            if name in aliases and aliases[name] in found:
                target = found[aliases[name]]
                result[name] = TagInfo(name, target.category, target.post_count, target.wiki, target.name)
            elif name in found:
                result[name] = found[name]
            else:
                result[name] = TagInfo(name, known=False)
        return result

    def _batches(self, names: List[str]) -> Iterator[List[str]]:
        batch: List[str] = []
        length = 0
        for name in names:
            quoted = len(httpx2.URL("", params={"q": name}).query) + 1
            if batch and (len(batch) >= self.settings.danbooru_batch_size or length + quoted > MAX_URL_CHARS):
                yield batch
                batch, length = [], 0
            batch.append(name)
            length += quoted
        if batch:
            yield batch

    async def _tags(self, names: List[str]) -> Dict[str, TagInfo]:
        rows = await self._get("/tags.json", {
            "search[name_comma]": ",".join(names),
            "only": "name,category,post_count,wiki_page[body,is_deleted]",
            "limit": 1000})
        found = {}
        for row in rows if isinstance(rows, list) else ():
            if not isinstance(row, dict) or not row.get("name"):
                continue
            page = row.get("wiki_page") if isinstance(row.get("wiki_page"), dict) else {}
            body = None if page.get("is_deleted") else (page.get("body") or None)
            found[row["name"]] = TagInfo(row["name"], CATEGORY_NAMES.get(row.get("category")),
                                         _int(row.get("post_count")), body)
        return found

    async def _aliases(self, names: List[str]) -> Dict[str, str]:
        rows = await self._get("/tag_aliases.json", {
            "search[antecedent_name_comma]": ",".join(names), "search[status]": "active",
            "only": "antecedent_name,consequent_name,status", "limit": 1000})
        return {row["antecedent_name"]: row["consequent_name"] for row in rows if isinstance(row, dict)
                and row.get("status", "active") == "active" and row.get("antecedent_name") and row.get("consequent_name")}

    async def _get(self, path: str, params: dict):
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._get_once(path, params)
            except _Fault as fault:
                if not self.policy.should_retry(attempt, is_retryable(fault.kind, fault.status)):
                    raise fault.final from None
                await asyncio.sleep(self.policy.delay(attempt, fault.retry_after))

    async def _paced(self) -> None:
        """Start requests at most `danbooru_rate` per second."""
        async with self._pace:
            now = time.monotonic()
            wait = self._next_start - now
            self._next_start = max(now, self._next_start) + 1.0 / self.settings.danbooru_rate
        if wait > 0:
            await asyncio.sleep(wait)

    async def _get_once(self, path: str, params: dict):
        async with self.slots:
            await self._paced()
            self.tally.update("danbooru.requests")
            try:
                response = await self.http.get(path, params=params)
            except httpx2.TimeoutException as exc:
                raise _Fault(SourceError(f"{self.describe()} timed out ({type(exc).__name__})"),
                             Kind.TIMEOUT) from None
            except httpx2.TransportError as exc:
                raise _Fault(SourceUnreachable(f"cannot reach {self.describe()} ({type(exc).__name__}: "
                                               f"{exc or 'no detail'})"), Kind.CONNECTION) from None
        status = response.status_code
        content_type = response.headers.get("content-type", "")
        if is_retryable(Kind.HTTP, status):
            raise _Fault(SourceError(f"{self.describe()} answered HTTP {status} {_kind(content_type)} "
                                     "(rate limited or down; try again later)"),
                         Kind.HTTP, status, parse_retry_after(response.headers))
        if status == 403:
            raise SourceError(f"{self.describe()} refused access (HTTP 403 {_kind(content_type)}; likely "
                              "Cloudflare blocking this client): try later, set tag_provider.login and "
                              "tag_provider.api_key, or use tag_provider.source: file")
        if status != 200 or "json" not in content_type:
            raise SourceError(f"{self.describe()} answered HTTP {status} {_kind(content_type)} for {path}")
        try:
            data = response.json()
        except ValueError:
            raise SourceError(f"{self.describe()} sent malformed JSON for {path}") from None
        if not isinstance(data, list):  # e.g. {"success": false, "error": "RateLimiter::RateLimitError"}
            message = data.get("message") or data.get("error") if isinstance(data, dict) else None
            raise SourceError(f"{self.describe()} answered {path} with an error: {message or str(data)[:120]}")
        return data

    async def close(self) -> None:
        await self.http.aclose()


class _Fault(Exception):
    """One failed request: the error to raise if it is the last, and what the retry policy needs."""

    def __init__(self, final: SourceError, kind: Kind, status: Optional[int] = None,
                 retry_after: Optional[float] = None):
        super().__init__(str(final))
        self.final = final
        self.kind = kind
        self.status = status
        self.retry_after = retry_after


def _kind(content_type: str) -> str:
    if "html" in content_type:
        return "with an HTML page"
    return f"with {content_type or 'no content type'}"


def _int(value) -> Optional[int]:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


class FileSource:
    """A local wiki dump: Danbooru's NDJSON export of `wiki_pages` (optionally gzipped), a CSV
    with `title,body` columns, or a JSON list of such objects; categories and post counts
    from an optional export of `tags`. Loaded once; lookups cost no request."""

    def __init__(self, config: Config):
        settings = config.tag_provider
        if not settings.wiki_dump:
            raise ConfigError("tag_provider.source is 'file' but tag_provider.wiki_dump is not set")
        self.pages: Dict[str, str] = {}
        self.tags: Dict[str, dict] = {}
        wiki_path = config.path(settings.wiki_dump)
        for row in _read_rows(wiki_path, "tag_provider.wiki_dump"):
            title, body = row.get("title"), row.get("body")
            if title and body and str(row.get("is_deleted", "")).lower() not in ("true", "1", "t"):
                self.pages[normalize_title(str(title))] = str(body)
        if settings.tags_dump:
            for row in _read_rows(config.path(settings.tags_dump), "tag_provider.tags_dump"):
                if row.get("name"):
                    self.tags[str(row["name"])] = row

    def describe(self) -> str:
        return "the wiki dump"

    async def lookup(self, names: List[str]) -> Dict[str, TagInfo]:
        result = {}
        for name in names:
            tag = self.tags.get(name, {})
            body = self.pages.get(name)
            category = CATEGORY_NAMES.get(_int(tag.get("category")))
            result[name] = TagInfo(name, category, _int(tag.get("post_count")), body,
                                   known=bool(tag) or body is not None)
        return result

    async def close(self) -> None:
        pass


def _read_rows(path: Path, key: str) -> Iterable[dict]:
    try:
        raw = path.read_bytes()
        if path.suffix == ".gz":
            raw = gzip.decompress(raw)
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as exc:
        reason = getattr(exc, "strerror", None) or str(exc).splitlines()[0] or type(exc).__name__
        raise ConfigError(f"{key}: cannot read {path}: {reason}") from None
    name = path.name.removesuffix(".gz")
    try:
        if name.endswith(".csv"):
            return list(csv.DictReader(io.StringIO(text)))
        stripped = text.lstrip()
        if stripped.startswith("["):
            rows = json.loads(text)
            return [row for row in rows if isinstance(row, dict)]
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (ValueError, csv.Error) as exc:
        raise ConfigError(f"{key}: {path} is not NDJSON, a JSON list or a CSV ({exc})") from None


class NoSource:
    def describe(self) -> str:
        return "no source"

    async def lookup(self, names: List[str]) -> Dict[str, TagInfo]:
        return {name: TagInfo(name, known=False) for name in names}

    async def close(self) -> None:
        pass


def make_source(config: Config, tally: Optional[Tally] = None):
    source = config.tag_provider.source
    if source == "danbooru":
        return DanbooruSource(config.tag_provider, tally)
    if source == "file":
        return FileSource(config)
    if source == "none":
        return NoSource()
    raise ConfigError(f"tag_provider.source must be danbooru, file or none (got {source!r})")
