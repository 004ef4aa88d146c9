"""`tag_provider.source: file`: tag knowledge from a local dump (see dumps.py), held in memory.

The dump is read once, when the run starts, into plain dictionaries holding only what
captions use: a page's body (as UTF-8 bytes: one Japanese name makes a Python string of the
whole body two or four bytes a character), its other names and (in wiki-only dumps) its
category; a tag's category and post count packed into one integer (Danbooru has over a
million tags, and one int per tag is half the memory of a tuple); active aliases; active
implications. A lookup costs no request.
"""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from tagcaption.config import Config
from tagcaption.dumps import TABLES, dated, find_tables, name_list, read_rows, truthy
from tagcaption.errors import ConfigError
from tagcaption.tag_sources import TagInfo, TagSource, category_name, implied_by, normalize_title
from tagcaption.vocabulary import CATEGORIES

log = logging.getLogger("caption")

_CODES = {name: code for code, name in enumerate(CATEGORIES)}
_NO_CATEGORY = 7


def _pack(category: Optional[str], post_count: Optional[int]) -> int:
    """Category and post count in one int: three bits of category, then post count + 1 (0: none)."""
    return ((post_count + 1 if post_count is not None and post_count >= 0 else 0) << 3) \
        | _CODES.get(category, _NO_CATEGORY)


def _unpack(packed: int) -> Tuple[Optional[str], Optional[int]]:
    code, count = packed & 7, packed >> 3
    return (CATEGORIES[code] if code < len(CATEGORIES) else None), (count - 1 if count else None)


def _count(value: object) -> Optional[int]:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(float(value))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


def _tag_name(value: object) -> str:
    return value.strip().lower().replace(" ", "_") if isinstance(value, str) else ""


class FileSource(TagSource):
    def __init__(self, config: Config):
        files, keys = _table_files(config)
        started = time.monotonic()
        self.pages: Dict[str, bytes] = {}
        self.other_names: Dict[str, Tuple[str, ...]] = {}
        self.page_categories: Dict[str, str] = {}
        self.tags: Dict[str, int] = {}
        self.aliases: Dict[str, str] = {}
        self.parents: Dict[str, List[str]] = defaultdict(list)
        for path in files["wiki_pages"]:
            self._read_pages(path, keys["wiki_pages"])
        for path in files.get("tags", ()):
            for name, category, post_count in read_rows(path, TABLES["tags"], keys["tags"]):
                if _tag_name(name):
                    self.tags[_tag_name(name)] = _pack(category_name(category), _count(post_count))
        for table, into in (("tag_aliases", self._alias), ("tag_implications", self._implication)):
            for path in files.get(table, ()):
                for antecedent, consequent, status in read_rows(path, TABLES[table], keys[table]):
                    if _tag_name(antecedent) and _tag_name(consequent) and (status in (None, "") or status == "active"):
                        into(_tag_name(antecedent), _tag_name(consequent))
        wiki = files["wiki_pages"]
        self.origin = {"from": "dump", "file": wiki[0].name if len(wiki) == 1 else f"{wiki[0].parent.name}/ "
                       f"({len(wiki)} files)", "dated": dated(wiki)}
        self.loaded = (f"{len(self.pages):,} wiki pages, {len(self.tags):,} tags, {len(self.aliases):,} aliases, "
                       f"{sum(map(len, self.parents.values())):,} implications in {time.monotonic() - started:.1f} s")
        log.info("tag dump: %s", self.loaded)

    def _read_pages(self, path: Path, key: str) -> None:
        for title, body, other_names, is_deleted, category in read_rows(path, TABLES["wiki_pages"], key):
            if not isinstance(title, str) or not isinstance(body, (str, bytes)) or not body.strip() \
                    or truthy(is_deleted):
                continue
            title = normalize_title(title)
            self.pages[title] = body.encode("utf-8") if isinstance(body, str) else body
            names = name_list(other_names)
            if names:
                self.other_names[title] = tuple(names)
            if category_name(category):
                self.page_categories[title] = category_name(category)

    def _alias(self, antecedent: str, consequent: str) -> None:
        self.aliases[antecedent] = consequent

    def _implication(self, antecedent: str, consequent: str) -> None:
        self.parents[antecedent].append(consequent)

    def describe(self) -> str:
        return f"the tag dump ({self.origin['file']})"

    def _info(self, name: str, alias_of: Optional[str] = None) -> TagInfo:
        canonical = alias_of or name
        packed = self.tags.get(canonical)
        category, post_count = _unpack(packed) if packed is not None else (None, None)
        body = self.pages.get(canonical)
        known = packed is not None or body is not None or alias_of is not None or canonical in self.parents
        return TagInfo(name, category or self.page_categories.get(canonical), post_count,
                       body.decode("utf-8") if body is not None else None, alias_of, known,
                       list(self.other_names.get(canonical, ())))

    async def lookup(self, names: List[str]) -> Dict[str, TagInfo]:
        return {name: self._info(name, self.aliases.get(name)) for name in names}

    async def implications(self, names: List[str]) -> Dict[str, List[str]]:
        return implied_by(names, self.parents)


def _table_files(config: Config) -> Tuple[Dict[str, List[Path]], Dict[str, str]]:
    """Each table's files, and the config key a problem with them is reported under."""
    settings = config.tag_provider
    files: Dict[str, List[Path]] = {}
    keys = {table: "tag_provider.dump_dir" for table in TABLES}
    if settings.dump_dir:
        folder = config.path(settings.dump_dir)
        if not folder.is_dir():
            raise ConfigError(f"tag_provider.dump_dir: {folder} is not a folder")
        files = find_tables(folder)
        if "wiki_pages" not in files and not settings.wiki_dump:
            found = ", ".join(sorted(files)) or "no table at all"
            raise ConfigError(f"tag_provider.dump_dir: no wiki_pages table in {folder} (found {found}); it needs "
                              "wiki_pages.parquet, .csv, .ndjson or .jsonl (gzipped or not), as the "
                              "danbooru_wikis_full dataset ships it")
    for table, key in (("wiki_pages", "wiki_dump"), ("tags", "tags_dump")):
        if getattr(settings, key):
            files[table], keys[table] = [config.path(getattr(settings, key))], f"tag_provider.{key}"
    if "wiki_pages" not in files:
        raise ConfigError("tag_provider.source is 'file' but neither tag_provider.dump_dir nor "
                          "tag_provider.wiki_dump is set")
    return files, keys
