"""Whether the tag source is still asked in this run, and what the run's summary says about it.

A source that cannot serve the run (danbooru.DanbooruDown: a Cloudflare challenge, a refused
login, no answer after the retries) is given up once, with one warning saying what to do.
A Danbooru that did not answer (`NoAnswer`) is remembered in the cache for
`tag_provider.outage_minutes`: the next runs do not ask it (nor wait for it) until then,
unless `--refresh-tags` says to. The summary's line comes from the note `danbooru.down`.
"""
from __future__ import annotations

import logging
import time
from typing import Optional

from tagcaption.config import TagProviderConfig
from tagcaption.danbooru import DanbooruDown, NoAnswer
from tagcaption.errors import SourceUnreachable
from tagcaption.tag_cache import TagCache
from tagcaption.tally import Tally

log = logging.getLogger("caption")


class SourceWatch:
    def __init__(self, settings: TagProviderConfig, describe: str, origin: Optional[dict], tally: Tally):
        self.settings = settings
        self.describe = describe
        self.url = (origin or {}).get("url")
        self.tally = tally
        self.down: Optional[str] = None
        """Why the source is not asked any more in this run (the warning's text)."""
        self._brief: Optional[str] = None
        self._gave_up = False
        self._warned: set = set()

    def start(self, cache: TagCache, refresh: bool) -> None:
        """Take over an outage a previous run remembered, unless `refresh`."""
        outage = cache.outage(self.url) if self.url and not refresh else None
        if outage:
            since, until = (time.strftime("%H:%M", time.localtime(outage[key])) for key in ("since", "until"))
            self.down = (f"{self.describe} {outage['reason']} at {since}; it is not asked again until {until} "
                         "(tag_provider.outage_minutes; --refresh-tags asks anyway)")
            self._brief = f"{self.describe} did not answer at {since}, not asked until {until}"

    def give_up(self, exc: SourceUnreachable, cache: TagCache) -> None:
        if self.down is not None:
            return
        self.down, self._gave_up = str(exc), True
        self._brief = f"{self.describe} {exc.brief}" if isinstance(exc, DanbooruDown) else str(exc)
        if isinstance(exc, NoAnswer) and self.settings.outage_minutes > 0 and self.url:
            cache.remember_outage(self.url, self.settings.outage_minutes, exc.brief)
            self._brief += f"; not asked again for {self.settings.outage_minutes:g} min"

    def not_looked_up(self) -> None:
        """A tag went without knowledge because the source could not be asked."""
        self.tally.update("tags.lookup_failed")
        if self.down:
            self.warn(f"warning: {self.down}; captioning goes on without summaries for tags not in the cache")

    def warn(self, message: str) -> None:
        """Log `message` once per run."""
        if message not in self._warned:
            self._warned.add(message)
            log.warning("%s", message)

    def note(self) -> None:
        """The summary's line: what happened and how many tags went without knowledge."""
        without = self.tally["tags.lookup_failed"]
        if self._brief and (without or self._gave_up):
            self.tally.note("danbooru.down", f"{self._brief}; {without} tag{'' if without == 1 else 's'} went "
                                             "without knowledge")
