"""Every path a run writes, decided in one place before the first write.

Booru and WD14 folders keep tags in `<stem>.txt`, the same path as the default caption.
When the two collide, the tags are first kept as `<stem>.tags.txt` (the `.tags` part is
put before the tags extension) and the caption then replaces `<stem>.txt`. From then on
`<stem>.tags.txt` is where the image's tags are read, whatever the output settings of a
later run. The record of the captions this program wrote (`.tagcaption/captions.jsonl` in
the images folder) is the other marker: a file at a path in it is never read as tags, edited
by hand since or not (tags put back by hand belong in `<stem>.tags.txt`). Without the record
(deleted by hand) that marker is gone, and such a file is judged by its content again.

The run's own files are named here too, so no other module builds a path of its own: in
the images folder's `.tagcaption/` the lock, the caption record, the journal, the records
of every caption and the remembered settings; at the output root (`output.dir`, or the
images folder) `failures.jsonl`, `captions.jsonl` and the review page; `metadata.jsonl`
beside the images, where Hugging Face's imagefolder looks for it.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from tagcaption.errors import ConfigError
from tagcaption.files import read_regular
from tagcaption.state import CaptionRecord
from tagcaption.tagfiles import decode_text, looks_like_caption
from tagcaption.vocabulary import IMAGE_EXTENSIONS, STRUCTURED_SUFFIX

if TYPE_CHECKING:  # config.py checks output formats with outputs.py, which takes its paths from here
    from tagcaption.config import Config

KEPT_TAGS_MARK = ".tags"
STRUCTURED_MARK = STRUCTURED_SUFFIX[:-len(".json")]
"""`.caption`: an image whose stem ends so has another image's structured caption as `<stem>.json`."""
STATE_DIR = ".tagcaption"
FAILURES_FILE = "failures{suffix}.jsonl"
CAPTIONS_FILE = "captions.jsonl"
METADATA_FILE = "metadata.jsonl"
REPORT_FILE = "captions.html"


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
    ours: bool = False
    """This program wrote a caption to the caption file (edited by hand since or not)."""
    image: Any = field(default=None, compare=False, repr=False)
    """The image itself (bytes or a PIL image) when it has no file: a dataset row's (hf_run.py)."""
    structured_file: Optional[Path] = None
    """`<stem>.caption.json` beside the caption, when captions are asked as JSON objects."""
    not_sidecar: Optional[Path] = None
    """This image's `<stem>.json` when it is another image's structured caption written by this
    program (`a.caption.png` beside `a.png`'s `a.caption.json`): never read as a sidecar."""

    def has_caption(self) -> bool:
        """Whether a caption was already written (a crash between keeping the tags and
        writing the caption leaves two identical files: that is not a caption yet)."""
        if not self.caption_file.exists():
            return False
        if self.prose_caption or self.tags_backup is None:
            return True
        if self.tags_backup.exists():
            return read_regular(self.caption_file) != read_regular(self.tags_backup)
        return self.ours


class Layout:
    """Where a run over one images folder reads tags and writes everything."""

    def __init__(self, config: Config, shard_suffix: str = ""):
        if not config.images_dir:
            raise ConfigError("no images folder: give IMAGES_DIR on the command line or set images_dir")
        self.images_root = Path(config.images_dir)
        output_dir = config.path(config.output.dir) if config.output.dir else None
        self.output_dir = output_dir if output_dir is None or output_dir.resolve() != self.images_root.resolve() \
            else None
        """None when captions go beside the images (output.dir unset, or the images folder itself)."""
        self.root = self.output_dir or self.images_root
        """The output root: where the files a user reads go."""
        self.suffix = shard_suffix
        self.tags_extension = config.tags_extension or None
        self.caption_extension = config.output.extension
        self.record = CaptionRecord(self.images_root, self.caption_record)
        self.structured = bool(config.interpreter.response_schema) and not config.interpreter.skip
        self.variants = config.output.variants

    # --- the run's own files -----------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.images_root / STATE_DIR

    @property
    def old_state_dir(self) -> Optional[Path]:
        """Where runs before 0.2 kept their state with `output.dir` set (read once, then moved)."""
        return self.output_dir / STATE_DIR if self.output_dir else None

    @property
    def records(self) -> Path:
        """Every captioned image's record (tags, description, guards), newest per image."""
        return self.state_dir / "records.jsonl"

    @property
    def settings(self) -> Path:
        return self.state_dir / "settings.json"

    @property
    def lock(self) -> Path:
        return self.state_dir / f"lock{self.suffix}"

    @property
    def caption_record(self) -> Path:
        return self.state_dir / "captions.jsonl"

    @property
    def journal(self) -> Path:
        return self.state_dir / f"journal{self.suffix}.jsonl"

    @property
    def outputs_lock(self) -> Path:
        return self.state_dir / "outputs.lock"

    @property
    def failures(self) -> Path:
        return self.root / FAILURES_FILE.format(suffix=self.suffix)

    @property
    def captions_jsonl(self) -> Path:
        return self.root / CAPTIONS_FILE

    @property
    def metadata_jsonl(self) -> Path:
        return self.images_root / METADATA_FILE

    @property
    def report_page(self) -> Path:
        return self.root / REPORT_FILE

    @staticmethod
    def transcript(debug_dir: Path, item: ImageItem) -> Path:
        """`--debug-dir`: one file per image, its path inside the folder as one name."""
        return debug_dir / (item.rel.as_posix().replace("%", "%25").replace("/", "%2F") + ".json")

    def describe_captions(self) -> str:
        where = f"in {self.output_dir}, in the folders of {self.images_root}" if self.output_dir else \
            f"next to the images in {self.images_root}"
        several = f" ({self.variants} captions each, one a line)" if self.variants > 1 else ""
        structured = f" and <name>{STRUCTURED_SUFFIX}" if self.structured else ""
        return f"<name>{self.caption_extension}{several}{structured} {where}"

    # --- per image ---------------------------------------------------------------------

    def item(self, image: Path) -> ImageItem:
        """Where `image`'s tags come from and where its caption goes (reads the shared
        `<stem>.txt` when tags and caption collide, to tell tags from a caption)."""
        item = self._item(image)
        structured = item.caption_file.with_name(image.stem + STRUCTURED_SUFFIX) if self.structured else None
        sidecar = image.with_name(image.stem + ".json")
        ours = image.stem.endswith(STRUCTURED_MARK) and self.record.wrote(sidecar)
        if structured is None and not ours:
            return item
        return replace(item, structured_file=structured, not_sidecar=sidecar if ours else None)

    def _item(self, image: Path) -> ImageItem:
        rel = image.relative_to(self.images_root)
        out_folder = (self.output_dir / rel.parent) if self.output_dir else image.parent
        caption_file = out_folder / f"{image.stem}{self.caption_extension}"
        ours = self.record.wrote(caption_file)
        if not self.tags_extension:
            return ImageItem(image, rel, caption_file, None, None, ours=ours)
        plain = image.parent / f"{image.stem}{self.tags_extension}"
        kept = image.parent / f"{image.stem}{KEPT_TAGS_MARK}{self.tags_extension}"
        backup = kept if plain == caption_file else None  # both from resolved folders: equal paths are one file
        if kept.exists():
            return ImageItem(image, rel, caption_file, kept, backup, ours=ours)
        if not plain.exists() or self.record.wrote(plain):
            return ImageItem(image, rel, caption_file, None, backup, ours=ours)
        if backup is not None and looks_like_caption(decode_text(read_regular(plain))):
            return ImageItem(image, rel, caption_file, None, backup, prose_caption=True, ours=ours)
        return ImageItem(image, rel, caption_file, plain, backup, ours=ours)

    def tags_owner(self, image: Path) -> Optional[Path]:
        """The image whose kept tags file would be this image's caption file (`a.tags.png`'s
        caption `a.tags.txt` is where `a.png`'s tags are kept), if there is one."""
        kept_here = self.tags_extension == self.caption_extension and self.output_dir is None
        if not kept_here or not image.stem.endswith(KEPT_TAGS_MARK):
            return None
        base = image.stem[: -len(KEPT_TAGS_MARK)]
        for extension in IMAGE_EXTENSIONS:
            for candidate in (image.with_name(base + extension), image.with_name(base + extension.upper())):
                if candidate.exists():
                    return candidate
        return None
