"""Where tag knowledge comes from: Danbooru's API (danbooru.py), local dumps (dumps.py), or nowhere.

A source answers `lookup(names)` with, for each tag, its category, post count, the tag it is
an alias of, its wiki page's DText body (None when it has none) and the page's other names;
and `implications(names)` with every tag each one implies, transitively (`very_long_hair` →
`long_hair`). `origin` says where the text came from, for the cache's provenance.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Sequence

from tagcaption.errors import ConfigError, SourceError, SourceUnreachable
from tagcaption.vocabulary import CATEGORIES, DANBOORU_CATEGORIES

if TYPE_CHECKING:
    from tagcaption.config import Config
    from tagcaption.tally import Tally

__all__ = ["TagInfo", "TagSource", "SourceError", "SourceUnreachable",
           "NoSource", "make_source", "normalize_title", "category_name", "implied_by", "CATEGORY_NAMES"]

CATEGORY_NAMES = DANBOORU_CATEGORIES


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
    other_names: List[str] = field(default_factory=list)
    """The wiki page's other names (`初音ミク`, `Hatsune Miku`), as the source spells them."""


def normalize_title(title: str) -> str:
    """Danbooru's normalize_title: lowercase, no leading `~`, whitespace runs as one `_`."""
    title = "_".join(title.strip().lower().lstrip("~").split())
    while "__" in title:
        title = title.replace("__", "_")
    return title.strip("_")


def category_name(value: object) -> Optional[str]:
    """A category as Danbooru's API and dumps write it (`4`, `"4"`, `4.0`) or by name (`"character"`)."""
    if isinstance(value, str) and value.strip().lower() in CATEGORIES:
        return value.strip().lower()
    if isinstance(value, bool):
        return None
    try:
        return DANBOORU_CATEGORIES.get(int(float(value)))  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None


def implied_by(names: Iterable[str], parents: Mapping[str, Sequence[str]]) -> Dict[str, List[str]]:
    """Every tag each name implies through `parents` (direct implications), however deep;
    a cycle in the data (which Danbooru forbids) ends the walk instead of looping."""
    result = {}
    for name in names:
        seen, stack = set(), list(parents.get(name, ()))
        while stack:
            parent = stack.pop()
            if parent not in seen and parent != name:
                seen.add(parent)
                stack.extend(parents.get(parent, ()))
        result[name] = sorted(seen)
    return result


class TagSource:
    """What every tag source offers; the two methods are asked many names at a time."""

    origin: Optional[dict] = None
    """Where the source's text comes from (`{"from": "danbooru", "url": …}`), kept with cache entries."""

    def describe(self) -> str:
        raise NotImplementedError

    async def lookup(self, names: List[str]) -> Dict[str, TagInfo]:
        raise NotImplementedError

    async def implications(self, names: List[str]) -> Dict[str, List[str]]:
        return {name: [] for name in names}

    async def close(self) -> None:
        pass


class NoSource(TagSource):
    def describe(self) -> str:
        return "no source"

    async def lookup(self, names: List[str]) -> Dict[str, TagInfo]:
        return {name: TagInfo(name, known=False) for name in names}


def make_source(config: "Config", tally: Optional["Tally"] = None) -> TagSource:
    source = config.tag_provider.source
    if source == "danbooru":
        from tagcaption.danbooru import DanbooruSource

        return DanbooruSource(config.tag_provider, tally)
    if source == "file":
        from tagcaption.offline import FileSource

        return FileSource(config)
    if source == "none":
        return NoSource()
    raise ConfigError(f"tag_provider.source must be danbooru, file or none (got {source!r})")
