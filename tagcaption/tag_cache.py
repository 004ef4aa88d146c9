"""`tags_cache.json`: what is known about each tag, kept across runs and datasets.

Each entry records the wiki text its summary was made from, the model and the summary
template (by hash) it was made with, and when. A summary made with another model or
template is made again from the stored wiki text, with no new lookup; a "no wiki page"
answer expires after `negative_ttl_days`. The file is read once, rewritten atomically at
most once a second as entries arrive, merged with what other runs sharing it wrote in
the meantime, and a damaged file is moved aside with a warning, never emptied.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Dict, Optional, Set

from tagcaption.errors import ConfigError, os_error_text
from tagcaption.files import atomic_write_text

log = logging.getLogger("caption")

VERSION = 2


class TagCache:
    FLUSH_INTERVAL = 1.0

    def __init__(self, path: Path, read_only: bool = False):
        self.path = path
        self.entries: Dict[str, dict] = {}
        self._touched: Set[str] = set()
        self._disk_mtime: Optional[float] = None
        self._dirty = False
        self._last_flush = 0.0
        self._flushing: Optional[asyncio.Task] = None
        self.read_only = read_only
        """A dry run reads the cache but never writes it."""

    def load(self) -> None:
        folder = self.path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"tag_provider.cache_file: cannot write to the folder {folder}")
        if self.path.exists():
            self.entries.update(self._read())

    def _read(self) -> Dict[str, dict]:
        try:
            self._disk_mtime = self.path.stat().st_mtime
            data = json.loads(self.path.read_text(encoding="utf-8"))
            tags = data.get("tags", data) if isinstance(data, dict) else None
            if not isinstance(tags, dict):
                raise ValueError("not a JSON object of tags")
        except OSError as exc:
            raise ConfigError(os_error_text(exc, self.path, "tag cache")) from None
        except (ValueError, UnicodeDecodeError) as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(aside)
            log.warning("warning: tag cache %s is damaged (%s); moved it to %s and starting empty",
                        self.path, str(exc).splitlines()[0], aside.name)
            self._disk_mtime = None
            return {}
        entries = {}
        for name, entry in tags.items():
            if isinstance(entry, str):  # a plain {"tag": "summary"} cache from the original script
                entry = {"summary": entry}
            if isinstance(entry, dict):
                entries[name] = entry
        return entries

    def get(self, tag: str) -> Optional[dict]:
        """The tag's entry; one damaged by hand (not a mapping, text where a number or a string
        belongs) counts as absent, so the tag is looked up again and the entry rewritten."""
        entry = self.entries.get(tag)
        return entry if _well_formed(entry) else None

    def put(self, tag: str, entry: dict) -> None:
        self.entries[tag] = entry
        self._touched.add(tag)
        self._dirty = True
        if time.monotonic() - self._last_flush >= self.FLUSH_INTERVAL and not self._flushing:
            self._flushing = asyncio.create_task(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        try:
            await self.flush()
        finally:
            self._flushing = None

    async def flush(self) -> None:
        if not self._dirty or self.read_only:
            return
        self._dirty = False
        self._last_flush = time.monotonic()
        try:
            await asyncio.to_thread(self._write)
        except (OSError, ConfigError) as exc:
            self._dirty = True
            log.warning("warning: cannot save tag cache %s: %s", self.path, getattr(exc, "strerror", None) or exc)

    def _write(self) -> None:
        """Merge in what another run sharing the file wrote since we read it, then replace it."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime is not None and mtime != self._disk_mtime:
            for name, entry in self._read().items():
                if name not in self._touched:
                    self.entries[name] = entry
        text = json.dumps({"version": VERSION, "tags": self.entries}, ensure_ascii=False, indent=1, sort_keys=True)
        atomic_write_text(self.path, text + "\n")
        self._disk_mtime = self.path.stat().st_mtime

    async def close(self) -> None:
        if self._flushing:
            await self._flushing
        await self.flush()


def _well_formed(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    if not all(isinstance(entry.get(key), (str, type(None))) for key in ("summary", "wiki", "category", "model")):
        return False
    checked, count = entry.get("checked"), entry.get("post_count")
    return (checked is None or isinstance(checked, (int, float))) and (count is None or isinstance(count, int))
