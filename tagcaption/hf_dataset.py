"""`--dataset`: the rows of a Hugging Face dataset, read as the run goes.

A path that exists is local: a folder written by `save_to_disk` is opened with
`load_from_disk`, a parquet/CSV/JSON/arrow file or any other folder (parquet files, an
imagefolder) with `load_dataset`; anything else is a name on the Hub (`dataset.split`,
`.config_name`, `.revision`). With `dataset.streaming` the rows arrive as they download.

Images are never decoded by the library nor written to disk: the image column is read as
it is stored (the file's bytes, or a path to it), and only the rows that need a caption
have their image fetched. In a dataset that is not streamed, the walk reads only the light
columns (id, tags, name, caption) and a row's image is taken when its turn comes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence

from tagcaption.config import DatasetConfig
from tagcaption.errors import ConfigError, ImageError
from tagcaption.files import read_regular
from tagcaption.tagfiles import normalize_tag

log = logging.getLogger("caption")

INSTALL = "pip install '.[datasets]' (or pip install 'datasets>=2.16')"
FILE_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json", ".arrow": "arrow",
                 ".tar": "webdataset"}
"""A single local file: the `load_dataset` builder that reads it, by its extension."""
LIGHT_BATCH = 512
"""Rows whose light columns are read at once when a dataset is not streamed."""


def require_datasets():
    """The `datasets` library, imported only by a dataset run (it is an optional extra)."""
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"--dataset needs the Hugging Face datasets library, which is not installed: "
                          f"{INSTALL}") from None
    datasets.logging.set_verbosity_error()
    return datasets


@dataclass
class Row:
    index: int
    """The row's position in the split (in the stream, when streamed)."""
    id: str
    tags: List[str]
    name: str = ""
    caption: Optional[str] = None
    """The text the caption column already holds, if any."""
    data: Optional[dict] = None
    """The whole row, images undecoded, when streamed (else it is read again by index)."""


def split_tags(value: Any) -> List[str]:
    """A list as is; a string on its commas (or lines) when it has any, else on its spaces, as
    boorus write them (`long_hair blue_eyes`). Normalised, first occurrence kept."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        items = [str(item) for item in value if item is not None]
    else:
        text = str(value)
        items = text.replace("\n", ",").split(",") if ("," in text or "\n" in text) else text.split()
    seen: dict = {}
    for item in items:
        tag = normalize_tag(item)
        if tag:
            seen.setdefault(tag, None)
    return list(seen)


def _text(value: Any) -> Optional[str]:
    return value.strip() or None if isinstance(value, str) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def saved_to_disk(path: Path) -> bool:
    """A folder `save_to_disk` wrote (a dataset, or a dict of splits)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


class DatasetSource:
    def __init__(self, name: str, settings: DatasetConfig, show_progress: bool = True):
        library = require_datasets()
        if not show_progress:
            library.disable_progress_bars()
        self.name, self.settings, self.library = name, settings, library
        self.path = Path(name) if Path(name).exists() else None
        loaded = self._load()
        library.disable_progress_bars()  # saving parts draws bars of its own
        self.streaming = isinstance(loaded, library.IterableDataset)
        self.raw = loaded
        self.features = loaded.features
        self.columns: List[str] = list(loaded.column_names or (self.features or {}))
        self._check_columns()
        self.undecoded = self._undecoded(loaded)
        if not self.streaming:
            light = [column for column in (settings.id_column, settings.tags_column, settings.name_column,
                                           settings.caption_column) if column and column in self.columns]
            self._light = self.undecoded.select_columns(sorted(set(light))) if light else None
            self._images = self.undecoded.select_columns([settings.image_column])

    def describe(self) -> str:
        return str(self.path) if self.path else f"{self.name} (Hugging Face Hub)"

    # --- loading ---------------------------------------------------------------------------

    def _load(self):
        settings, library, path = self.settings, self.library, self.path
        try:
            if path is not None and saved_to_disk(path):
                loaded = self._split(library.load_from_disk(str(path)))
                return loaded.to_iterable_dataset() if settings.streaming else loaded
            if path is not None and path.is_file():
                builder = FILE_BUILDERS.get(path.suffix.lower())
                if builder is None:
                    raise ConfigError(f"--dataset {path}: not a dataset file (use a folder written by save_to_disk, "
                                      f"or a {', '.join(sorted(FILE_BUILDERS))} file)")
                return self._split(library.load_dataset(builder, data_files=str(path), split=settings.split,
                                                        streaming=settings.streaming))
            if path is not None:
                return self._split(library.load_dataset(str(path), split=settings.split,
                                                        streaming=settings.streaming))
            return self._split(library.load_dataset(self.name, name=settings.config_name, split=settings.split,
                                                    revision=settings.revision, streaming=settings.streaming))
        except ConfigError:
            raise
        except Exception as exc:  # the library's many errors (not found, offline, unknown split…): one line
            log.debug("loading the dataset failed", exc_info=True)
            raise ConfigError(f"cannot read the dataset {self.name}: {_first_line(exc)}") from None

    def _split(self, loaded):
        """One split of a dict of splits: `dataset.split`, else `train`, else the only one."""
        if not isinstance(loaded, (self.library.DatasetDict, self.library.IterableDatasetDict)):
            return loaded
        names = list(loaded.keys())
        wanted = self.settings.split or ("train" if "train" in names or len(names) != 1 else names[0])
        if wanted not in names:
            raise ConfigError(f"dataset.split {wanted!r}: {self.name} has the split(s) {', '.join(names)}")
        return loaded[wanted]

    def _check_columns(self) -> None:
        settings = self.settings
        if not self.columns:
            return  # a stream that does not say its columns: the first row is checked instead
        for key in ("image_column", "tags_column", "id_column", "name_column"):
            column = getattr(settings, key)
            if column and column not in self.columns:
                raise ConfigError(f"dataset.{key} {column!r} is not a column of {self.name} (its columns: "
                                  f"{', '.join(self.columns)})")
        for key in ("caption_column", "description_column"):
            column = getattr(settings, key)
            feature = (self.features or {}).get(column)
            if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string", "null"):
                raise ConfigError(f"dataset.{key} {column!r} holds {feature} in {self.name}, not text: name "
                                  "another column for the captions")

    def _undecoded(self, loaded):
        """The same rows with images as stored (bytes or path), not as PIL images."""
        feature = (self.features or {}).get(self.settings.image_column)
        if isinstance(feature, self.library.Image):
            return loaded.cast_column(self.settings.image_column, self.library.Image(decode=False))
        return loaded

    # --- rows ------------------------------------------------------------------------------

    @property
    def num_rows(self) -> Optional[int]:
        """Rows in the split; for a stream, as its card says, if it does."""
        if not self.streaming:
            return len(self.raw)
        splits = getattr(self.raw.info, "splits", None) or {}
        split = splits.get(str(self.raw.split)) if self.raw.split is not None else None
        return getattr(split, "num_examples", None) or None

    def rows(self, indices: Optional[Sequence[int]] = None) -> Iterator[Row]:
        """Every row (or those at `indices`, in that order), images left out unless streamed."""
        if self.streaming:
            yield from self._streamed()
            return
        order = list(indices) if indices is not None else None
        count = len(order) if order is not None else len(self.raw)
        if self._light is None:
            for position in range(count):
                yield self._row(order[position] if order is not None else position, {})
            return
        light = self._light.select(order) if order is not None else self._light
        position = 0
        for batch in light.iter(batch_size=LIGHT_BATCH):
            for offset in range(len(next(iter(batch.values())))):
                index = order[position] if order is not None else position
                yield self._row(index, {column: values[offset] for column, values in batch.items()})
                position += 1

    def _streamed(self) -> Iterator[Row]:
        for index, data in enumerate(self.undecoded):
            if index == 0 and self.settings.image_column not in data:
                raise ConfigError(f"dataset.image_column {self.settings.image_column!r} is not a column of "
                                  f"{self.name} (its columns: {', '.join(data)})")
            row = self._row(index, data)
            row.data = data
            yield row

    def _row(self, index: int, values: dict) -> Row:
        settings = self.settings
        row_id = values.get(settings.id_column) if settings.id_column else index
        return Row(index, "" if row_id is None else str(row_id), split_tags(values.get(settings.tags_column)),
                   str(values.get(settings.name_column) or "").strip(), _text(values.get(settings.caption_column)))

    def image(self, row: Row):
        """The row's image as bytes or a PIL image; ImageError when it has none (file I/O for
        an image stored as a path: call it in a thread)."""
        column = self.settings.image_column
        value = (row.data or {}).get(column) if self.streaming else self._images[row.index][column]
        if isinstance(value, dict):
            data, where = value.get("bytes"), value.get("path")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            data, where = bytes(value), None
        elif isinstance(value, str):
            data, where = None, value
        elif hasattr(value, "save") and hasattr(value, "mode"):
            return value  # a PIL image the library decoded
        else:
            data = where = None
        if data:
            return data
        if where:
            file = Path(where)
            if not file.is_absolute() and self.path is not None:
                file = (self.path if self.path.is_dir() else self.path.parent) / file
            try:
                return read_regular(file)
            except OSError as exc:
                raise ImageError(f"image: cannot read {where}: {exc.strerror or exc}", stage="input") from None
        raise ImageError(f"image: the row has no image in column {column!r}", stage="input")
