"""Danbooru's JSON API as a tag source, as Danbooru behaves in 2026.

Many tags per request: `/tags.json` with `search[name_comma]` and the wiki page nested
through `only=`, `/tag_aliases.json` for names that turn out to be aliases, and
`/tag_implications.json` for what tags imply. Polite: a User-Agent naming this program (and
the account, with `login`), at most `danbooru_rate` requests a second, retries as
`retry.RetryPolicy` says (408, 409, 429, 5xx, timeouts and connection errors, honouring
Retry-After).

A Danbooru that cannot serve us is given up for the rest of the run at once, not batch by
batch (every further request would meet the same):

- a Cloudflare challenge (a `cf-mitigated: challenge` header, or an HTML page where JSON
  belongs) or a refused login (401, 403): `Challenged`, with what to do about it;
- a request that still fails after its retries: Danbooru is down or will not serve us now.
  When it did not answer at all (timeouts), `NoAnswer`: the tag provider remembers the outage
  in the cache, so that the next run does not wait out the same timeouts.
"""
from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Dict, Iterator, List, Optional

import httpx2  # installed by openai; its async client keeps Danbooru lookups on the event loop

from tagcaption import tls
from tagcaption.config import TagProviderConfig
from tagcaption.endpoint import is_loopback
from tagcaption.errors import Kind, SourceError, SourceUnreachable
from tagcaption.retry import RetryPolicy, is_retryable, parse_retry_after
from tagcaption.sinks import register_secret, shorten
from tagcaption.tag_sources import TagInfo, TagSource, category_name, implied_by
from tagcaption.tally import Tally
from tagcaption.version import NAME, USER_AGENT, VERSION

MAX_URL_CHARS = 3000
IMPLICATION_DEPTH = 10
"""Rounds of asking for the parents of parents; Danbooru's implication chains are far shorter."""
ADVICE = ("set tag_provider.login and tag_provider.api_key (an API key from your Danbooru profile), work "
          "offline from a dump (tag_provider.source: file, see docs/tag-knowledge.md), or set "
          "tag_provider.source: none")


class DanbooruDown(SourceUnreachable):
    """Danbooru cannot serve this run: every later request would fail the same way. `brief`
    says what happened in a few words, for the run's summary."""

    def __init__(self, message: str, brief: str = ""):
        super().__init__(message)
        self.brief = brief or message


class Challenged(DanbooruDown):
    """Danbooru (or Cloudflare in front of it) answered with a challenge, an HTML page or a
    refusal instead of its API."""


class NoAnswer(DanbooruDown):
    """Danbooru did not answer, retries included: the outage is remembered, so that the next
    run does not wait again."""


def user_agent(login: str) -> str:
    """`tagcaption/0.1.0 (by alice)`: Danbooru asks scripts to name themselves and their user."""
    return f"{NAME}/{VERSION} (by {login})" if login else USER_AGENT


class DanbooruSource(TagSource):
    def __init__(self, settings: TagProviderConfig, tally: Optional[Tally] = None):
        self.settings = settings
        self.base_url = settings.danbooru_url.rstrip("/")
        self.origin = {"from": "danbooru", "url": self.base_url}
        self.policy = RetryPolicy(settings.danbooru_retries, 0.5, 30.0)
        self.tally = tally if tally is not None else Tally()
        auth = None
        if settings.login and settings.api_key:
            register_secret(settings.api_key, login=settings.login)
            auth = (settings.login, settings.api_key)
        self.http = httpx2.AsyncClient(
            base_url=self.base_url, headers={"User-Agent": user_agent(settings.login), "Accept": "application/json"},
            timeout=settings.danbooru_timeout, trust_env=not is_loopback(self.base_url), follow_redirects=True,
            auth=auth, verify=tls.context_for(self.base_url))
        self.slots = asyncio.Semaphore(max(1, settings.danbooru_concurrency))
        self.down: Optional[DanbooruDown] = None
        """Why Danbooru was given up for this run; every later request fails at once with it."""
        self._next_start = 0.0
        self._pace = asyncio.Lock()

    def describe(self) -> str:
        return f"Danbooru at {self.base_url}"

    async def lookup(self, names: List[str]) -> Dict[str, TagInfo]:
        """Everything known about `names`, in ⌈len / batch⌉ requests plus alias lookups."""
        found: Dict[str, TagInfo] = {}
        for batch in self._batches(names):
            found.update(await self._tags(batch))
        # An aliased tag may still exist on Danbooru, emptied of its posts: check those too.
        missing = [name for name in names if name not in found or (not found[name].post_count
                                                                   and not found[name].wiki)]
        aliases: Dict[str, str] = {}
        for batch in self._batches(missing):
            aliases.update({name: parents[0] for name, parents in (await self._relations(
                "/tag_aliases.json", batch)).items()})
        targets = sorted(set(aliases.values()) - set(found))
        for batch in self._batches(targets):
            found.update(await self._tags(batch))
        result = {}
        for name in names:
            if name in aliases and aliases[name] in found:
                target = found[aliases[name]]
                result[name] = TagInfo(name, target.category, target.post_count, target.wiki, target.name,
                                       other_names=target.other_names)
            else:
                result[name] = found.get(name) or TagInfo(name, known=False)
        return result

    async def implications(self, names: List[str]) -> Dict[str, List[str]]:
        """Every tag each name implies: its parents, then theirs, a batched request per round."""
        parents: Dict[str, List[str]] = {}
        frontier = list(dict.fromkeys(names))
        for _ in range(IMPLICATION_DEPTH):
            frontier = [name for name in frontier if name not in parents]
            if not frontier:
                break
            found: Dict[str, List[str]] = {}
            for batch in self._batches(frontier):
                found.update(await self._relations("/tag_implications.json", batch))
            parents.update({name: found.get(name, []) for name in frontier})
            frontier = sorted({parent for implied in found.values() for parent in implied})
        return implied_by(names, parents)

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
            "only": "name,category,post_count,wiki_page[body,other_names,is_deleted]",
            "limit": 1000})
        found = {}
        for row in rows:
            if not isinstance(row, dict) or not isinstance(row.get("name"), str) or not row["name"]:
                continue
            page = row.get("wiki_page") if isinstance(row.get("wiki_page"), dict) else {}
            deleted = bool(page.get("is_deleted"))
            body = None if deleted or not isinstance(page.get("body"), str) else (page["body"] or None)
            other = page.get("other_names") if isinstance(page.get("other_names"), list) and not deleted else []
            found[row["name"]] = TagInfo(row["name"], category_name(row.get("category")), _int(row.get("post_count")),
                                         body, other_names=[name for name in other if isinstance(name, str)])
        return found

    async def _relations(self, path: str, names: List[str]) -> Dict[str, List[str]]:
        """Active aliases or implications of `names`: antecedent → its consequents."""
        rows = await self._get(path, {
            "search[antecedent_name_comma]": ",".join(names), "search[status]": "active",
            "only": "antecedent_name,consequent_name,status", "limit": 1000})
        found: Dict[str, List[str]] = defaultdict(list)
        for row in rows:
            if isinstance(row, dict) and row.get("status", "active") == "active":
                antecedent, consequent = row.get("antecedent_name"), row.get("consequent_name")
                if isinstance(antecedent, str) and isinstance(consequent, str) and antecedent and consequent:
                    found[antecedent].append(consequent)
        return found

    async def _get(self, path: str, params: dict) -> list:
        attempt = 0
        while True:
            if self.down is not None:
                raise self.down
            attempt += 1
            try:
                return await self._get_once(path, params)
            except _Fault as fault:
                if self.policy.should_retry(attempt, True):
                    await asyncio.sleep(self.policy.delay(attempt, fault.retry_after))
                    continue
                attempts = f"{attempt} attempt{'s' if attempt > 1 else ''}"
                kind = NoAnswer if fault.kind is Kind.TIMEOUT else DanbooruDown
                self.down = kind(f"{fault} ({attempts}); not asked again this run", f"{fault.brief} ({attempts})")
            except DanbooruDown as exc:
                self.down = exc
            raise self.down

    async def _paced(self) -> None:
        """Start requests at most `danbooru_rate` per second."""
        async with self._pace:
            now = time.monotonic()
            wait = self._next_start - now
            self._next_start = max(now, self._next_start) + 1.0 / self.settings.danbooru_rate
        if wait > 0:
            await asyncio.sleep(wait)

    async def _get_once(self, path: str, params: dict) -> list:
        async with self.slots:
            await self._paced()
            self.tally.update("danbooru.requests")
            try:
                response = await self.http.get(path, params=params)
            except httpx2.TimeoutException as exc:
                raise _Fault(f"{self.describe()} did not answer within {self.settings.danbooru_timeout:g} s "
                             f"({type(exc).__name__})", Kind.TIMEOUT, "did not answer") from None
            except httpx2.TooManyRedirects:
                raise SourceError(f"{self.describe()} sent the request round in redirects (check "
                                  "tag_provider.danbooru_url)") from None
            except httpx2.TransportError as exc:
                raise _Fault(f"cannot reach {self.describe()} ({type(exc).__name__}: {exc or 'no detail'})",
                             Kind.CONNECTION, "could not be reached") from None
        return self._judge(response, path)

    def _judge(self, response: httpx2.Response, path: str) -> list:
        """The JSON list Danbooru answered, or the error that says why there is none."""
        status, content_type = response.status_code, response.headers.get("content-type", "")
        if response.headers.get("cf-mitigated", "").strip().lower() == "challenge":
            raise Challenged(f"{self.describe()} answered with a Cloudflare challenge (HTTP {status}, "
                             f"cf-mitigated: challenge) instead of its API: {ADVICE}",
                             f"answered with a Cloudflare challenge (HTTP {status})")
        if is_retryable(Kind.HTTP, status):
            raise _Fault(f"{self.describe()} answered HTTP {status} {_kind(content_type)} (rate limited or down)",
                         Kind.HTTP, f"answered HTTP {status}", parse_retry_after(response.headers))
        if status == 401:
            raise Challenged(f"{self.describe()} refused the login (HTTP 401): check tag_provider.login and "
                             "tag_provider.api_key (the API key from your Danbooru profile, not the password)",
                             "refused the login (HTTP 401)")
        if "html" in content_type or status == 403:
            raise Challenged(f"{self.describe()} answered HTTP {status} {_kind(content_type)} instead of its API "
                             f"(a Cloudflare challenge, a refusal or a maintenance page): {ADVICE}",
                             f"answered HTTP {status} {_kind(content_type)} instead of its API")
        if status != 200 or "json" not in content_type:
            raise SourceError(f"{self.describe()} answered HTTP {status} {_kind(content_type)} for {path}")
        try:
            data = response.json()
        except (ValueError, RecursionError):
            raise SourceError(f"{self.describe()} sent malformed JSON for {path}") from None
        if not isinstance(data, list):  # e.g. {"success": false, "error": "RateLimiter::RateLimitError"}
            message = data.get("message") or data.get("error") if isinstance(data, dict) else None
            raise SourceError(f"{self.describe()} answered {path} with an error: {shorten(message or data, 120)}")
        return data

    async def close(self) -> None:
        await self.http.aclose()


class _Fault(Exception):
    """One failed request worth another try, and what the retry policy needs."""

    def __init__(self, message: str, kind: Kind, brief: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.kind = kind
        self.brief = brief
        self.retry_after = retry_after


def _kind(content_type: str) -> str:
    if "html" in content_type:
        return "with an HTML page"
    return f"with {content_type or 'no content type'}"


def _int(value) -> Optional[int]:
    if isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
