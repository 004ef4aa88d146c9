"""The image folder: which images there are, where their tags come from, where captions go.

Booru and WD14 folders keep tags in `<stem>.txt`, the same path as the default caption.
When the two collide, the tags are first kept as `<stem>.tags.txt` (the `.tags` part is
put before the tags extension) and the caption then replaces `<stem>.txt`. From then on
`<stem>.tags.txt` is the tags file, and its presence is what marks `<stem>.txt` as a
caption, so a rerun never reads a caption back as tags. An image with no tags still
gets an empty `<stem>.tags.txt` for the same reason.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Set, Tuple

from tagcaption.config import Config
from tagcaption.files import is_leftover_temp

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
        self.leftover_temps: Set[Path] = set()
        """Temp files of a killed run, seen while walking; removed once the run holds the lock."""

    def folders(self) -> Iterator[Iterator[Path]]:
        """The images folder by folder (see `listing`), each image's Path made as it is reached."""
        for folder, names in self.listing():
            yield map(folder.joinpath, names)

    def listing(self, ordered: bool = True) -> Iterator[Tuple[Path, Iterable[str]]]:
        """Each folder with its image names, in a stable order: folders sorted, and in each
        folder images sorted by name stem, then extension (so two images sharing a stem, and
        so a caption file, come one after the other). One folder's names at a time: a folder
        of 50,000 images costs names, not objects. Unordered (to count them), the names come
        as the folder is read and none are kept."""
        if not self.root.is_dir():
            raise ValueError(f"images folder not found: {self.root}")
        waiting = [self.root]
        while waiting:
            here = waiting.pop()
            subfolders: List[Path] = []
            names: Iterable[str] = self._read_folder(here, subfolders)
            if ordered:  # by stem, then extension; one string per key costs a third of a tuple
                names = sorted(names, key=lambda name: "\0".join(os.path.splitext(name)))
            yield here, names  # read to the end before the next folder: that fills `subfolders`
            waiting += sorted(subfolders, reverse=True)

    def _read_folder(self, folder: Path, subfolders: List[Path]) -> Iterator[str]:
        """The image names of one folder as it is read, hidden ones left out; its subfolders go
        into `subfolders` when recursive. Like os.walk, an unreadable folder counts as empty
        and symlinked folders are not followed."""
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    name = entry.name
                    if is_leftover_temp(name):
                        self.leftover_temps.add(folder / name)
                    elif name.startswith("."):
                        continue
                    elif _is_folder(entry):
                        if self.recursive and not entry.is_symlink() and folder / name != self.output_dir:
                            subfolders.append(folder / name)
                    elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        yield name
        except OSError:
            return

    def tags_owner(self, image: Path) -> Optional[Path]:
        """The image whose kept tags file would be this image's caption file (`a.tags.png`'s
        caption `a.tags.txt` is where `a.png`'s tags are kept), if there is one."""
        if not self.tags_extension or not image.stem.endswith(KEPT_TAGS_MARK):
            return None
        base = image.stem[: -len(KEPT_TAGS_MARK)]
        for extension in IMAGE_EXTENSIONS:
            for candidate in (image.with_name(base + extension), image.with_name(base + extension.upper())):
                if candidate.exists():
                    return candidate
        return None

    def item(self, image: Path) -> ImageItem:
        rel = image.relative_to(self.root)
        out_folder = (self.output_dir / rel.parent) if self.output_dir else image.parent
        caption_file = out_folder / f"{image.stem}{self.caption_extension}"
        if not self.tags_extension:
            return ImageItem(image, rel, caption_file, None, None)
        tags_file = image.parent / f"{image.stem}{self.tags_extension}"
        if tags_file != caption_file:  # both built from resolved folders: equal paths are one file
            return ImageItem(image, rel, caption_file, tags_file if tags_file.exists() else None, None)
        backup = image.parent / f"{image.stem}{KEPT_TAGS_MARK}{self.tags_extension}"
        if backup.exists():
            return ImageItem(image, rel, caption_file, backup, backup)
        if not tags_file.exists():
            return ImageItem(image, rel, caption_file, None, backup)
        if looks_like_caption(decode_text(tags_file.read_bytes())):
            return ImageItem(image, rel, caption_file, None, backup, prose_caption=True)
        return ImageItem(image, rel, caption_file, tags_file, backup)


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # as os.walk does: an entry that cannot be examined is taken for a file
        return False


def looks_like_caption(text: str) -> bool:
    """Sentences rather than tags: vlm-caption and others write captions to `<stem>.txt` too."""
    items = [item for item in re.split(r"[,\n]", text) if item.strip()]
    return any(len(item.split()) > 8 for item in items)


@dataclass(frozen=True)
class Shard:
    """`--shard K/N`: this machine's share of the folder, chosen by a hash of each image's
    path, so N machines sharing the folder caption it without overlap or coordination."""
    index: int = 1
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
            raise ValueError(f"--shard takes K/N with 1 <= K <= N, like 2/8 (got {text!r})")
        return cls(int(match.group(1)), int(match.group(2)))

    def includes(self, rel: str) -> bool:
        if self.count == 1:
            return True
        return int(stable_fraction(rel) * self.count) == self.index - 1

    @property
    def suffix(self) -> str:
        return "" if self.count == 1 else f"-{self.index}-of-{self.count}"


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
    text = decode_text(path.read_bytes())
    if "\x00" in text:
        raise ValueError(f"{path} holds NUL bytes: not a text file")
    return text


@dataclass
class ImageTags:
    tags: List[str] = field(default_factory=list)
    categories: Dict[str, str] = field(default_factory=dict)
    """Categories the sidecar gives (general, character, copyright, artist, meta)."""
    rating: Optional[str] = None


SIDECAR_CATEGORIES = ("general", "character", "copyright", "artist", "meta")
RATINGS = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
"""Danbooru's one-letter ratings, as they read in a prompt."""


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on `key`: for choices that must repeat on a rerun."""
    return int(hashlib.sha1(key.encode("utf-8")).hexdigest()[:12], 16) / float(16 ** 12)


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


def _read_sidecar(image: Path) -> Optional[ImageTags]:
    for path in sidecar_paths(image):
        if path.is_file():
            try:
                return parse_sidecar(json.loads(decode_text(path.read_bytes())))
            except ValueError:
                log.warning("warning: %s is not valid JSON; its tags are ignored", path)
                return None
    return None


def read_image_tags(item: ImageItem, sources: List[str], combine: str) -> ImageTags:
    """The image's tags from the configured sources, in order: the first that has tags
    (`combine: first`), or all of them merged (`combine: all`). File I/O: call it in a thread."""
    result = ImageTags()
    for source in sources:
        if source == "txt":
            if item.tags_file is None:
                continue
            found = ImageTags(parse_tags(read_tags_text(item.tags_file)))
        else:
            found = _read_sidecar(item.path)
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
