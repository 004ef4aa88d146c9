"""An image's tags: from its tags file (comma- or line-separated booru tags, in whatever
encoding Windows tools wrote) or a downloader's JSON sidecar, and tag names in Danbooru's form.
"""
from __future__ import annotations

import codecs
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from tagcaption.files import read_regular
from tagcaption.vocabulary import CATEGORIES

log = logging.getLogger("caption")


def looks_like_caption(text: str) -> bool:
    """Sentences rather than tags: vlm-caption and others write captions to `<stem>.txt` too."""
    items = [item for item in re.split(r"[,\n]", text) if item.strip()]
    return any(len(item.split()) > 8 for item in items)


def normalize_tag(tag: str) -> str:
    """Danbooru's form of a tag name: `Long Hair` and `long_hair` are the same tag."""
    tag = tag.strip().replace("\\(", "(").replace("\\)", ")").lower()
    return re.sub(r"_+", "_", re.sub(r"\s+", "_", tag)).strip("_")


def display_tag(tag: str) -> str:
    """How a tag reads in a prompt: underscores as spaces, except in short emoticons like `^_^`."""
    return tag if len(tag) <= 3 else tag.replace("_", " ")


def parse_tags(text: str) -> List[str]:
    """Comma- or line-separated tags, normalised, empties dropped, first occurrence kept."""
    seen: dict = {}
    for raw in re.split(r"[,\n]", text):
        tag = normalize_tag(raw)
        if tag and tag not in seen:
            seen[tag] = None
    return list(seen)


def decode_text(data: bytes) -> str:
    """UTF-8 (with or without BOM), UTF-16 with its BOM (Windows Notepad's "Unicode"); files
    from older Windows tools fall back to Latin-1."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


MAX_TAGS_FILE = 1_000_000
"""Bytes; a larger `.txt` beside an image is not a tags file."""


def read_tags_text(path: Path) -> str:
    """A tags file's text; ValueError (one line for the user) when it is not a tags file."""
    size = path.stat().st_size
    if size > MAX_TAGS_FILE:
        raise ValueError(f"{path} is {size / 1e6:.1f} MB: too large for a tags file")
    text = decode_text(read_regular(path))
    if "\x00" in text:
        raise ValueError(f"{path} holds NUL bytes: not a text file")
    return text


@dataclass
class ImageTags:
    tags: List[str] = field(default_factory=list)
    categories: Dict[str, str] = field(default_factory=dict)
    """Categories the sidecar gives (general, character, copyright, artist, meta)."""
    rating: Optional[str] = None




def sidecar_paths(image: Path, not_sidecar: Optional[Path] = None) -> List[Path]:
    """gallery-dl writes `<image file name>.json`; other tools `<stem>.json`. `not_sidecar` is
    left out: another image's structured caption of ours (layout.py)."""
    return [path for path in (image.with_name(image.name + ".json"), image.with_suffix(".json"))
            if path != not_sidecar]


def parse_sidecar(data: object) -> Optional[ImageTags]:
    """Tags, their categories and the rating from a gallery-dl Danbooru sidecar, if it is one."""
    if not isinstance(data, dict):
        return None
    found = ImageTags(rating=data.get("rating") if isinstance(data.get("rating"), str) else None)
    for category in CATEGORIES:
        names = data.get(f"tag_string_{category}")
        listed = data.get(f"tags_{category}")
        names = names.split() if isinstance(names, str) else (listed if isinstance(listed, list) else [])
        for name in names:
            tag = normalize_tag(str(name))
            if tag and tag not in found.categories:
                found.categories[tag] = category
                found.tags.append(tag)
    if not found.tags:
        plain = data.get("tag_string") if isinstance(data.get("tag_string"), str) else None
        listed = data.get("tags") if isinstance(data.get("tags"), list) else None
        found.tags = parse_tags(",".join(plain.split()) if plain else ",".join(map(str, listed or [])))
    return found if found.tags else None


def _read_sidecar(image: Path, not_sidecar: Optional[Path]) -> Optional[ImageTags]:
    for path in sidecar_paths(image, not_sidecar):
        if path.is_file():
            try:
                return parse_sidecar(json.loads(decode_text(path.read_bytes())))
            except ValueError:
                log.warning("warning: %s is not valid JSON; its tags are ignored", path, extra={
                    "group": "sidecar_json", "item": path.name,
                    "summary": "warning: {count} sidecars are not valid JSON; their tags were ignored"})
                return None
    return None


def read_image_tags(image: Path, tags_file: Optional[Path], sources: List[str], combine: str,
                    not_sidecar: Optional[Path] = None) -> ImageTags:
    """The image's tags from the configured sources, in order: the first that has tags
    (`combine: first`), or all of them merged (`combine: all`). A sidecar the tags did not come
    from still gives their categories and the rating (a WD14 `.txt` beside a downloader's
    `.json`). File I/O: call it in a thread."""
    result = ImageTags()
    used = set()
    for source in sources:
        if source == "txt":
            if tags_file is None:
                continue
            found = ImageTags(parse_tags(read_tags_text(tags_file)))
        else:
            found = _read_sidecar(image, not_sidecar)
        if not found or not found.tags:
            continue
        used.add(source)
        seen = set(result.tags)
        result.tags += [tag for tag in found.tags if tag not in seen]
        for tag, category in found.categories.items():
            result.categories.setdefault(tag, category)
        result.rating = result.rating or found.rating
        if combine == "first":
            break
    if result.tags and "sidecar" in sources and "sidecar" not in used:
        try:
            _categories_from(_read_sidecar(image, not_sidecar), result)
        except (OSError, ValueError, RecursionError):  # only the categories are lost: the tags are read
            pass
    return result


def _categories_from(sidecar: Optional[ImageTags], result: ImageTags) -> None:
    if not sidecar:
        return
    for tag in result.tags:
        if tag in sidecar.categories:
            result.categories.setdefault(tag, sidecar.categories[tag])
    result.rating = result.rating or sidecar.rating
