"""The image folder: which images there are, where their tags come from, where captions go.

Booru and WD14 folders keep tags in `<stem>.txt`, the same path as the default caption.
When the two collide, the tags are first kept as `<stem>.tags.txt` (the `.tags` part is
put before the tags extension) and the caption then replaces `<stem>.txt`. From then on
`<stem>.tags.txt` is the tags file, and its presence is what marks `<stem>.txt` as a
caption, so a rerun never reads a caption back as tags. An image with no tags still
gets an empty `<stem>.tags.txt` for the same reason.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional

import logging

import aiofiles

from config import Config
from files import is_leftover_temp

log = logging.getLogger("caption")

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                              ".avif", ".heic", ".heif"})
KEPT_TAGS_MARK = ".tags"


@dataclass(frozen=True)
class ImageItem:
    path: Path
    rel: Path
    caption_file: Path
    tags_file: Optional[Path]
    """Where this image's tags are read from, or None when it has none."""
    tags_backup: Optional[Path]
    """Where tags are kept before a caption replaces them; None when the paths don't collide."""
    prose_caption: bool = False
    """The shared `<stem>.txt` holds sentences, not tags: a caption from another tool."""

    def has_caption(self) -> bool:
        """Whether a caption was already written (a crash between keeping the tags and
        writing the caption leaves two identical files: that is not a caption yet)."""
        if not self.caption_file.exists():
            return False
        if self.prose_caption:
            return True
        if self.tags_backup is None:
            return True
        if not self.tags_backup.exists():
            return False
        return self.caption_file.read_bytes() != self.tags_backup.read_bytes()


class Dataset:
    def __init__(self, config: Config):
        if not config.images_dir:
            raise ValueError("no images folder: give IMAGES_DIR on the command line or set images_dir")
        self.root = Path(config.images_dir)
        self.recursive = config.recursive
        self.tags_extension = config.tags_extension or None
        self.caption_extension = config.output.extension
        self.output_dir = config.path(config.output.dir) if config.output.dir else None
        self.leftover_temps: List[Path] = []
        """Temp files of a killed run, seen while walking; removed once the run holds the lock."""

    def find_images(self) -> List[Path]:
        """All images under the folder, in a stable order (sorted by folder, then name)."""
        if not self.root.is_dir():
            raise ValueError(f"images folder not found: {self.root}")
        return list(self._walk())

    def _walk(self) -> Iterator[Path]:
        for folder, subfolders, files in os.walk(self.root, onerror=None, followlinks=False):
            here = Path(folder)
            subfolders[:] = sorted(d for d in subfolders
                                   if not d.startswith(".") and (here / d) != self.output_dir)
            for name in sorted(files):
                if is_leftover_temp(name):
                    self.leftover_temps.append(here / name)
                elif not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                    yield here / name
            if not self.recursive:
                return

    def item(self, image: Path) -> ImageItem:
        rel = image.relative_to(self.root)
        out_folder = (self.output_dir / rel.parent) if self.output_dir else image.parent
        caption_file = out_folder / f"{image.stem}{self.caption_extension}"
        if not self.tags_extension:
            return ImageItem(image, rel, caption_file, None, None)
        tags_file = image.parent / f"{image.stem}{self.tags_extension}"
        if tags_file.resolve() != caption_file.resolve():
            return ImageItem(image, rel, caption_file, tags_file if tags_file.exists() else None, None)
        backup = image.parent / f"{image.stem}{KEPT_TAGS_MARK}{self.tags_extension}"
        if backup.exists():
            return ImageItem(image, rel, caption_file, backup, backup)
        if not tags_file.exists():
            return ImageItem(image, rel, caption_file, None, backup)
        if looks_like_caption(decode_text(tags_file.read_bytes())):
            return ImageItem(image, rel, caption_file, None, backup, prose_caption=True)
        return ImageItem(image, rel, caption_file, tags_file, backup)

    def tags_backup_name(self, image: Path) -> Optional[Path]:
        if not self.tags_extension:
            return None
        return image.parent / f"{image.stem}{KEPT_TAGS_MARK}{self.tags_extension}"


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
    """UTF-8 (with or without BOM); files from older Windows tools fall back to Latin-1."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


@dataclass
class ImageTags:
    tags: List[str] = field(default_factory=list)
    categories: Dict[str, str] = field(default_factory=dict)
    """Categories the sidecar gives (general, character, copyright, artist, meta)."""
    rating: Optional[str] = None


SIDECAR_CATEGORIES = ("general", "character", "copyright", "artist", "meta")


def sidecar_paths(image: Path) -> List[Path]:
    """gallery-dl writes `<image file name>.json`; other tools `<stem>.json`."""
    return [image.with_name(image.name + ".json"), image.with_suffix(".json")]


def parse_sidecar(data: object) -> Optional[ImageTags]:
    """Tags, their categories and the rating from a gallery-dl Danbooru sidecar, if it is one."""
    if not isinstance(data, dict):
        return None
    found = ImageTags(rating=data.get("rating") if isinstance(data.get("rating"), str) else None)
    for category in SIDECAR_CATEGORIES:
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


async def _read_sidecar(image: Path) -> Optional[ImageTags]:
    for path in sidecar_paths(image):
        if path.is_file():
            async with aiofiles.open(path, "rb") as handle:
                raw = await handle.read()
            try:
                return parse_sidecar(json.loads(decode_text(raw)))
            except ValueError:
                log.warning("warning: %s is not valid JSON; its tags are ignored", path)
                return None
    return None


async def read_image_tags(item: ImageItem, sources: List[str], combine: str) -> ImageTags:
    """The image's tags from the configured sources, in order: the first that has tags
    (`combine: first`), or all of them merged (`combine: all`)."""
    result = ImageTags()
    for source in sources:
        if source == "txt":
            if item.tags_file is None:
                continue
            async with aiofiles.open(item.tags_file, "rb") as handle:
                found = ImageTags(parse_tags(decode_text(await handle.read())))
        else:
            found = await _read_sidecar(item.path)
        if not found or not found.tags:
            continue
        seen = set(result.tags)
        result.tags += [tag for tag in found.tags if tag not in seen]
        for tag, category in found.categories.items():
            result.categories.setdefault(tag, category)
        result.rating = result.rating or found.rating
        if combine == "first":
            break
    return result
