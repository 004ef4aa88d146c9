"""`tags_cache.json`: what is known about each tag, kept across runs and datasets.

Each entry records the wiki text its summary was made from, the model and the summary
template (by hash) it was made with, when (`checked`, `created`), and where the text came
from (`source`: Danbooru and its URL, or a dump file and its date), so that a cache built
from a dump can be shared. A summary made with another model or template is made again from
the stored wiki text, with no new lookup; a "no wiki page" answer expires after
`negative_ttl_days`. An entry with a field of the wrong type counts as absent: the tag is
looked up again and the entry rewritten.

The file is read once. After each new entry a timer rewrites it (atomically) within
FLUSH_INTERVAL, so the last summaries of a burst are saved too, and it is written once more
at the end; each write merges what other runs sharing the file wrote in the meantime. A file
that cannot be parsed, for whatever reason, is moved aside with a warning, never emptied.
`outages` remembers a Danbooru that did not answer (see tag_provider.py).

Two cache files are combined with `python -m tagcaption.tag_cache merge INTO FROM…` (see
`combine` for which entry wins).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from tagcaption.deadlines import FILE_READ_SECONDS, Stalled, off_loop
from tagcaption.errors import ConfigError, os_error_text
from tagcaption.files import atomic_write_text, read_regular
from tagcaption.vocabulary import CATEGORIES

log = logging.getLogger("caption")

VERSION = 2

FIELDS: Dict[str, tuple] = {
    "summary": (str,), "wiki": (str,), "category": (str,), "model": (str,), "template": (str,),
    "alias_of": (str,), "refused": (str,), "created": (str,), "spelling": (str,),
    "post_count": (int,), "checked": (int, float), "known": (bool,), "implies": (list,), "source": (dict,)}
"""Every field an entry may have and its type (null is always allowed); others are kept as they are."""

Entries = Dict[str, dict]


def well_formed(entry: object) -> bool:
    """Whether every field of `entry` has its type (and a category is one of Danbooru's)."""
    if not isinstance(entry, dict):
        return False
    for key, types in FIELDS.items():
        value = entry.get(key)
        if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
            return False
    if entry.get("category") is not None and entry["category"] not in CATEGORIES:
        return False
    if isinstance(entry.get("checked"), float) and not math.isfinite(entry["checked"]):
        return False
    if not all(isinstance(name, str) for name in entry.get("implies") or ()):
        return False
    return all(isinstance(value, str) for value in (entry.get("source") or {}).values())


def _outage_ok(record: object) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("reason"), str)
            and all(isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool)
                    and math.isfinite(record[key]) for key in ("since", "until")))


def parse_cache(data: bytes) -> Tuple[Entries, Dict[str, dict]]:
    """The entries and outages of a cache file's bytes; ValueError or RecursionError when
    they are not one. A cache from the original script (`{"tag": "summary"}`) is read too."""
    document = json.loads(data.decode("utf-8-sig"))
    tags = document.get("tags", document) if isinstance(document, dict) else None
    if not isinstance(tags, dict):
        raise ValueError("not a JSON object of tags")
    entries = {name: {"summary": entry} if isinstance(entry, str) else entry for name, entry in tags.items()
               if isinstance(entry, (str, dict))}
    outages = document.get("outages") if "tags" in document else None
    return entries, {key: record for key, record in (outages if isinstance(outages, dict) else {}).items()
                     if _outage_ok(record)}


def _rank(entry: dict) -> tuple:
    return bool(entry.get("summary")), bool(entry.get("wiki")), float(entry.get("checked") or 0)


def combine(caches: List[Entries]) -> Entries:
    """One cache from several: per tag, an entry with a summary beats one without, one with
    wiki text beats one without, then the more recently looked-up wins (the earlier cache on a
    tie); entries with a field of the wrong type are left out."""
    result: Entries = {}
    for entries in caches:
        for name, entry in entries.items():
            if well_formed(entry) and (name not in result or _rank(entry) > _rank(result[name])):
                result[name] = entry
    return result


class TagCache:
    FLUSH_INTERVAL = 1.0

    def __init__(self, path: Path, read_only: bool = False):
        self.path = path
        self.entries: Entries = {}
        self.outages: Dict[str, dict] = {}
        self._touched: Set[str] = set()
        self._outages_touched: Set[str] = set()
        self._disk_mtime: Optional[float] = None
        self._dirty = False
        self._last_flush = 0.0
        self._timer: Optional[asyncio.TimerHandle] = None
        self._flushing: Optional[asyncio.Task] = None
        self._warned: Set[str] = set()
        self.read_only = read_only
        """A dry run reads the cache but never writes it."""

    def load(self) -> None:
        folder = self.path.parent
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise ConfigError(f"tag_provider.cache_file: cannot write to the folder {folder}")
        if self.path.exists():
            entries, outages = self._read()
            self.entries.update(entries)
            self.outages.update(outages)

    def _read(self) -> Tuple[Entries, Dict[str, dict]]:
        try:
            self._disk_mtime = self.path.stat().st_mtime
            data = read_regular(self.path)
        except OSError as exc:
            raise ConfigError(os_error_text(exc, self.path, "tag cache")) from None
        try:
            return parse_cache(data)
        except RecursionError:
            self._move_aside("nested too deeply")
        except ValueError as exc:
            self._move_aside(str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__)
        return {}, {}

    def _move_aside(self, reason: str) -> None:
        aside = self.path.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
        number = 1
        while aside.exists():
            number += 1
            aside = aside.with_name(f"{self.path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{number}")
        try:
            self.path.rename(aside)
        except OSError as exc:
            raise ConfigError(f"tag cache {self.path} is damaged ({reason}) and cannot be moved aside "
                              f"({exc.strerror or exc}): move or delete it") from None
        log.warning("warning: tag cache %s is damaged (%s); moved it to %s and starting empty",
                    self.path, reason, aside.name)
        self._disk_mtime = None

    def get(self, tag: str) -> Optional[dict]:
        """The tag's entry; one damaged by hand (a field of the wrong type) counts as absent."""
        entry = self.entries.get(tag)
        return entry if well_formed(entry) else None

    def put(self, tag: str, entry: dict) -> None:
        self.entries[tag] = entry
        self._touched.add(tag)
        self._changed()

    def outage(self, key: str) -> Optional[dict]:
        """The outage remembered for `key` (a Danbooru URL) while it lasts: since, until, reason."""
        record = self.outages.get(key)
        return record if record is not None and record["until"] > time.time() else None

    def remember_outage(self, key: str, minutes: float, reason: str) -> None:
        now = time.time()
        self.outages[key] = {"since": now, "until": now + minutes * 60, "reason": reason}
        self._outages_touched.add(key)
        self._changed()

    def _changed(self) -> None:
        """Something new to save: within FLUSH_INTERVAL of the last write, by a timer."""
        self._dirty = True
        if self.read_only or self._timer is not None or self._flushing is not None:
            return
        delay = max(0.0, self.FLUSH_INTERVAL - (time.monotonic() - self._last_flush))
        self._timer = asyncio.get_running_loop().call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        self._flushing = asyncio.ensure_future(self._flush_in_background())

    async def _flush_in_background(self) -> None:
        try:
            await self.flush()
        finally:
            self._flushing = None
            if self._dirty:  # entries that arrived while writing
                self._changed()

    async def flush(self) -> None:
        if not self._dirty or self.read_only:
            return
        self._dirty = False
        self._last_flush = time.monotonic()
        snapshot = (dict(self.entries), dict(self.outages), set(self._touched), set(self._outages_touched))
        try:
            entries, outages = await off_loop(self._write, *snapshot, seconds=FILE_READ_SECONDS,
                                              what=f"saving the tag cache {self.path}")
        except (OSError, ConfigError, Stalled) as exc:
            self._dirty = True
            message = getattr(exc, "strerror", None) or str(exc)
            if message not in self._warned:
                self._warned.add(message)
                log.warning("warning: cannot save tag cache %s: %s", self.path, message)
            return
        for name, entry in entries.items():  # what other runs wrote, for the tags this run left alone
            if name not in self._touched:
                self.entries[name] = entry
        self.outages.update({key: record for key, record in outages.items() if key not in self._outages_touched})

    def _write(self, entries: Entries, outages: Dict[str, dict], touched: Set[str], outages_touched: Set[str]) -> tuple:
        """Merge in what another run sharing the file wrote since we read it, then replace it.
        Runs in a thread, on copies: the event loop goes on changing the originals."""
        try:
            mtime = self.path.stat().st_mtime
        except FileNotFoundError:
            mtime = None
        if mtime is not None and mtime != self._disk_mtime:
            theirs, their_outages = self._read()
            entries.update({name: entry for name, entry in theirs.items() if name not in touched})
            outages.update({key: record for key, record in their_outages.items() if key not in outages_touched})
        document = {"version": VERSION, "tags": entries, **({"outages": outages} if outages else {})}
        atomic_write_text(self.path, json.dumps(document, ensure_ascii=False, indent=1, sort_keys=True) + "\n")
        self._disk_mtime = self.path.stat().st_mtime
        return entries, outages

    async def close(self) -> None:
        while self._timer is not None or self._flushing is not None:  # a flush ending may set a timer
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._flushing is not None:
                await self._flushing
        await self.flush()


def main(argv: Optional[List[str]] = None) -> int:
    """`python -m tagcaption.tag_cache merge INTO FROM…`: combine caches into INTO (see `combine`)."""
    parser = argparse.ArgumentParser(prog="python -m tagcaption.tag_cache", description=main.__doc__)
    parser.add_argument("command", choices=["merge"])
    parser.add_argument("into", type=Path, help="the cache to write (its own entries count first, if it exists)")
    parser.add_argument("sources", type=Path, nargs="+", help="caches to take entries from")
    args = parser.parse_args(argv)
    caches = []
    for path in ([args.into] if args.into.exists() else []) + args.sources:
        try:
            caches.append(parse_cache(path.read_bytes())[0])
        except (OSError, ValueError, RecursionError) as exc:
            print(f"cannot read tag cache {path}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return 2
    merged = combine(caches)
    atomic_write_text(args.into, json.dumps({"version": VERSION, "tags": merged}, ensure_ascii=False, indent=1,
                                            sort_keys=True) + "\n")
    print(f"{args.into}: {len(merged)} tags from {len(caches)} caches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
