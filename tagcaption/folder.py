"""Which images a folder holds, read one directory at a time.

A folder of 50,000 images costs its names, not objects: each directory's image names are
read (sorted, for a stable order) and handed out before the next directory is read, and
nothing is kept for a directory already passed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Set, Tuple

from tagcaption.errors import ConfigError
from tagcaption.files import is_leftover_temp
from tagcaption.vocabulary import IMAGE_EXTENSIONS


class Folder:
    def __init__(self, root: Path, recursive: bool, skip: Optional[Path] = None):
        self.root = root
        self.recursive = recursive
        self.skip = skip
        """A folder inside the images folder never walked (`output.dir` placed there)."""
        self.leftover_temps: Set[Path] = set()
        """Temp files of a killed run, seen while walking; removed once the run holds the lock."""
        self.unwalked: List[Path] = []
        """Subfolders seen and not walked (not recursive): `unread_images` tells which hold images."""

    def images(self) -> Iterator[Path]:
        for folder, names in self.listing():
            for name in names:
                yield Path(f"{folder}/{name}")

    def listing(self, ordered: bool = True) -> Iterator[Tuple[Path, Iterable[str]]]:
        """Each folder with its image names, in a stable order: folders sorted, and in each
        folder images sorted by name stem, then extension (so two images sharing a stem, and
        so a caption file, come one after the other). Unordered (to count them), the names
        come as the folder is read and none are kept."""
        if not self.root.is_dir():
            raise ConfigError(f"images folder not found: {self.root}")
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
                        if not entry.is_symlink() and folder / name != self.skip:
                            (subfolders if self.recursive else self.unwalked).append(folder / name)
                    elif os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and _is_file(entry):
                        yield name
        except OSError:
            return


def unread_images(folder: Folder, most: int = 2000) -> Tuple[List[str], bool]:
    """The subfolders a walk that was not recursive passed by that hold images of their own
    (kohya's `10_name/`), and whether every one was looked at: a look one level down, at most
    `most` of them, so a huge tree costs no more than a glance. File I/O: call it in a thread."""
    subfolders = sorted(set(folder.unwalked))
    found = [sub.name for sub in subfolders[:most]
             if next(iter(Folder(sub, False)._read_folder(sub, [])), None) is not None]
    return found, len(subfolders) <= most


def _is_file(entry: os.DirEntry) -> bool:
    """Anything but a folder: a link that leads nowhere, or a FIFO or device named like an
    image, is walked and fails as its image, with the reason (images.py refuses it unopened)."""
    try:
        return not entry.is_dir()
    except OSError:
        return True


def _is_folder(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:  # as os.walk does: an entry that cannot be examined is taken for a file
        return False
