"""Which images this run captions: the folder walked as captioning goes, this machine's
shard, a sample, or last run's failures; images with a caption skipped; images whose
caption would land on another's file failed.

The walk yields each image's path inside the folder (a short string: memory stays flat
however large the folder) and turns the event loop every SCAN_CHUNK entries so requests
flow meanwhile. A count of names in a thread gives the progress bar its total.
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Iterable, Iterator, List, Optional, Tuple

from tagcaption.errors import CaptionCollision, ConfigError, ImageProblem, TagsFileError, os_error_text
from tagcaption.folder import Folder
from tagcaption.layout import ImageItem, Layout
from tagcaption.state import read_failed_images
from tagcaption.tally import Tally

SCAN_CHUNK = 50
"""Entries (images or folders) the walk takes between two turns of the event loop."""


def stable_fraction(key: str) -> float:
    """A number in [0, 1) that depends only on `key`: for choices that must repeat on a rerun."""
    import hashlib

    # surrogateescape: a file name that is not UTF-8 hashes as its own bytes, the same on every machine
    return int(hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:12], 16) / float(16 ** 12)


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
            raise ConfigError(f"--shard takes K/N with 1 <= K <= N, like 2/8 (got {text!r})")
        return cls(int(match.group(1)), int(match.group(2)))

    def includes(self, rel: str) -> bool:
        if self.count == 1:
            return True
        return int(stable_fraction(rel) * self.count) == self.index - 1

    @property
    def suffix(self) -> str:
        return "" if self.count == 1 else f"-{self.index}-of-{self.count}"


Fail = Callable[[ImageItem, ImageProblem], None]


class WalkCounts:
    """How far a walk has got, from the tally: what it passed, and (once the count of names is
    known, `images.selected`) what it has yet to reach. Folder and dataset walks alike."""

    tally: Tally

    @property
    def walked(self) -> int:
        return self.tally["images.pending"] + self.tally["images.skipped"] + self.tally["images.rejected"]

    @property
    def unreached(self) -> int:
        return max(0, self.tally["images.selected"] - self.walked)


class Selection(WalkCounts):
    def __init__(self, layout: Layout, folder: Folder, tally: Tally, fail: Fail, *, overwrite: bool,
                 shard: Shard = Shard(), retry_failed: bool = False, sample: Optional[int] = None,
                 seed: int = 0):
        self.layout, self.folder, self.tally, self.fail = layout, folder, tally, fail
        self.overwrite = overwrite
        self.shard, self.retry_failed, self.sample, self.seed = shard, retry_failed, sample, seed
        self.counted = asyncio.Event()
        """Set once the count of names is known (`images.selected`)."""

    async def walk(self) -> AsyncIterator[str]:
        """The images that need a caption, as the walk finds them."""
        stop_counting = threading.Event()
        try:
            if self.sample is not None:
                images = self._sampled()
            else:
                images = self._to_caption(self._selected())
                self._start_count(stop_counting)
            for count, rel in enumerate(images, 1):
                if rel:
                    self.tally.update("images.pending")
                    yield rel
                if count % SCAN_CHUNK == 0:
                    await asyncio.sleep(0)
        finally:
            stop_counting.set()

    def _start_count(self, stop: threading.Event) -> None:
        count_in_background((entry is not None for entry in self._selected(ordered=False)), stop,
                            self.tally, self.counted, "count-images")

    def _selected(self, ordered: bool = True) -> Iterator[Optional[Tuple[Path, str, str]]]:
        """(folder, name, path inside the images folder) of each image this run is asked for;
        None for each image left out and each folder, so that walking them still counts."""
        failed = self._failed_before() if self.retry_failed else None
        try:
            for folder, names in self.folder.listing(ordered):
                yield None
                inside = folder.relative_to(self.layout.images_root).as_posix()
                prefix = "" if inside == "." else f"{inside}/"
                for name in names:
                    rel = prefix + name
                    if (failed is None or os.path.join(folder, name) in failed) and self.shard.includes(rel):
                        yield folder, name, rel
                    else:
                        yield None
        except OSError as exc:
            raise ConfigError(str(exc)) from None

    def _to_caption(self, selected_images: Iterable) -> Iterator[Optional[str]]:
        """For each image, its path inside the folder when it needs a caption, else None."""
        current, previous = None, [None]
        for selected in selected_images:
            if selected is None:
                yield None
                continue
            folder, name, rel = selected
            if folder != current:
                current, previous = folder, [None]  # images sharing a stem come in a row
            # From one string, not folder / name: Python 3.11's pathlib interns the parts it is
            # given, and a listed name would stay in the intern table as long as the listing.
            path = Path(f"{folder}/{name}")
            yield rel if self._needs_caption(path, previous) else None

    def _sampled(self) -> Iterator[Optional[str]]:
        """`--sample N`: the same N images of the selection for a seed, whatever has been
        captioned since (those among them are skipped like any captioned image)."""
        selected = [entry for entry in self._selected() if entry is not None]
        if len(selected) > self.sample:
            chosen = set(random.Random(self.seed).sample(range(len(selected)), self.sample))
            selected = [entry for index, entry in enumerate(selected) if index in chosen]
        self.tally.set("images.selected", len(selected))
        self.counted.set()
        return self._to_caption(selected)

    def _needs_caption(self, path: Path, previous: List[Optional[ImageItem]]) -> bool:
        """Whether the image needs a caption; one that is done is skipped, one that cannot be
        done fails. A caption must never land on a file another image relies on."""
        try:
            item = self.layout.item(path)
            done = not self.overwrite and item.has_caption()
        except OSError as exc:
            rel = path.relative_to(self.layout.images_root)
            self._reject(ImageItem(path, rel, path, None, None), TagsFileError(os_error_text(exc, path), stage="input"))
            return False
        before = previous[0]
        other = before.path if before is not None and before.caption_file == item.caption_file else \
            self.layout.tags_owner(path)
        previous[0] = item
        if other is not None:
            self._reject(item, CaptionCollision(f"its caption file {item.caption_file.name} would replace a file of "
                                                f"{other.name} (same name stem); rename one of them", stage="output"))
            return False
        if done:
            self.tally.update("images.skipped")
            return False
        return True

    def why_empty(self) -> str:
        """Why the walk found no image to caption, in one line; ConfigError (exit 2) when the
        folder holds no image this run could read at all."""
        skipped, walked = self.tally["images.skipped"], self.walked
        if skipped and skipped == walked:
            some = "" if self.shard.count == 1 and self.sample is None and not self.retry_failed else " selected"
            return (f"all {_images(skipped)}{some} have captions; add output.overwrite=true to caption them again "
                    "(a rerun with another style or template captions only images without a caption)")
        if walked:
            return "no image left to caption (the others failed, see above)"
        if self.retry_failed and not read_failed_images(self.layout.failures):
            return f"{self.layout.failures} lists no image: nothing to retry"
        if self.retry_failed:
            return f"none of the images listed in {self.layout.failures} is in the folder now: nothing to retry"
        here = sum(1 for _ in Folder(self.layout.images_root, False).images())
        if here and self.shard.count > 1:
            return f"this shard's share ({self.shard.index}/{self.shard.count}) of the {_images(here)} is empty"
        raise ConfigError(self._no_images())

    def _no_images(self) -> str:
        root = self.layout.images_root
        if self.folder.recursive:
            return f"no images in {root} or its subfolders (images end in .jpg, .png, .webp…)"
        folders: dict = {}
        for folder, names in Folder(root, True, skip=self.layout.output_dir).listing(ordered=False):
            count = sum(1 for _ in names)
            if count:
                folders[folder.relative_to(root).as_posix()] = count
        if not folders:
            return f"no images in {root} (images end in .jpg, .png, .webp…)"
        example = next((name for name in sorted(folders) if re.match(r"\d+_", name.split("/")[0])), None)
        like = f"kohya folders like {example}/" if example else f"like {sorted(folders)[0]}/"
        return (f"no images in {root.name}/ itself; {_images(sum(folders.values()))} in {len(folders)} "
                f"subfolder{'s' if len(folders) > 1 else ''} ({like}): add recursive=true")

    def _reject(self, item: ImageItem, problem: ImageProblem) -> None:
        self.tally.update("images.rejected")
        self.fail(item, problem)

    def _failed_before(self) -> set:
        if not self.layout.failures.exists():
            raise ConfigError(f"--retry-failed: no {self.layout.failures} from an earlier run")
        return set(read_failed_images(self.layout.failures))


def count_in_background(selected: Iterable[bool], stop: threading.Event, tally: Tally, counted: asyncio.Event,
                        name: str) -> None:
    """Count what this run is asked for (`images.selected`, then `counted` set) in a daemon
    thread that stops with the walk: a slow file server must not hold up the end of the run."""
    loop = asyncio.get_running_loop()

    def done(total: int) -> None:
        tally.set("images.selected", total)
        counted.set()

    def count() -> None:
        total = 0
        try:
            for chosen in selected:
                if stop.is_set():
                    return
                total += bool(chosen)
        except Exception:  # the walk meets the same problem and reports it
            return
        with contextlib.suppress(RuntimeError):  # the run is over and its loop closed
            loop.call_soon_threadsafe(done, total)
    threading.Thread(target=count, name=name, daemon=True).start()


def _images(count: int) -> str:
    return f"{count} image{'' if count == 1 else 's'}"
