"""Offline tag knowledge: Danbooru's tables as users download them, read once into memory.

`tag_provider.dump_dir` names a folder as `huggingface-cli download` or Danbooru's own
export leaves it; the tables are found by name — `wiki_pages`, `tags`, `tag_aliases`,
`tag_implications`, with or without a date or shard number (`tags-2024-04-07.csv.gz`,
`wiki_pages/000000000000.json`) — or, for a file named otherwise (`train-00000-of-00001.parquet`),
by its columns. Each may be parquet (with pyarrow: `pip install .[parquet]`), CSV, NDJSON or
a JSON list, gzipped or not, with Danbooru's column names. `wiki_dump` and `tags_dump` name
one file each and win over the folder's.

Only what captions use is kept (see `FileSource`): deleted pages, inactive aliases and
implications are dropped as they are read.
"""
from __future__ import annotations

import ast
import csv
import gzip
import io
import itertools
import json
import os
import re
import sys
import time
import zlib
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from tagcaption.errors import ConfigError

TABLES: Dict[str, Tuple[str, ...]] = {
    "wiki_pages": ("title", "body", "other_names", "is_deleted", "category"),
    "tags": ("name", "category", "post_count"),
    "tag_aliases": ("antecedent_name", "consequent_name", "status"),
    "tag_implications": ("antecedent_name", "consequent_name", "status"),
}
"""Each table's columns that are read (Danbooru's names); the first two of each are required
(`name` alone for tags)."""
OTHER_TABLES = ("tag_groups", "tag_versions", "wiki_page_versions", "artists", "artist_urls", "artist_versions",
                "artist_commentaries", "posts", "pools", "notes", "comments", "users", "favorites")
"""Danbooru's other tables, which dumps ship too (`tag_groups` has titles and bodies): never read."""
FORMATS = ("parquet", "ndjson", "jsonl", "json", "csv")
"""Also the order of preference when one table comes in several formats."""
SEARCH_DEPTH = 3
"""Folder levels searched below dump_dir (`data/train-….parquet` is one level down)."""

# Wiki bodies are longer than the csv module's default field limit (128 KiB) allows.
csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))


def data_format(path: Path) -> Optional[str]:
    """`parquet`, `csv`, … from the file name (`.gz` aside), or None for any other file."""
    name = path.name.lower().removesuffix(".gz")
    extension = name.rsplit(".", 1)[-1] if "." in name else ""
    return extension if extension in FORMATS else None


def _table_named(base: str, tables=TABLES) -> Optional[str]:
    """`wiki_pages`, `wiki_pages-000000000000`, `tags-2024-04-07` → the table; `tag_groups` → None."""
    base = base.lower()
    for table in sorted(tables, key=len, reverse=True):
        rest = base[len(table):]
        if base.startswith(table) and (not rest or (rest[0] in "-_." and rest[1:2].isdigit())):
            return table
    return None


def _table_of(path: Path, folder: Path) -> Optional[str]:
    stem = path.name.lower().removesuffix(".gz").rsplit(".", 1)[0]
    table = _table_named(stem)
    parent = path.parent
    while table is None and parent != folder and folder in parent.parents:
        table, parent = _table_named(parent.name), parent.parent
    if table is None and not _table_named(stem, OTHER_TABLES):
        table = _table_by_columns(path)
    return table


def _table_by_columns(path: Path) -> Optional[str]:
    """A file not named after a table is taken for one when its columns say so."""
    try:
        columns = set(_columns(path))
    except (OSError, ValueError, EOFError, zlib.error, ImportError, csv.Error):
        return None
    if {"title", "body"} <= columns:
        return "wiki_pages"
    if {"name", "post_count"} <= columns:
        return "tags"
    return None


def find_tables(folder: Path) -> Dict[str, List[Path]]:
    """The files of each table under `folder`, in one format (the first of FORMATS present;
    parquet only when pyarrow is installed, unless there is nothing else)."""
    found: Dict[str, Dict[str, List[Path]]] = defaultdict(lambda: defaultdict(list))
    for root, folders, files in os.walk(folder):
        depth = len(Path(root).relative_to(folder).parts)
        folders[:] = sorted(name for name in folders if not name.startswith(".") and depth < SEARCH_DEPTH)
        for name in sorted(files):
            path = Path(root) / name
            table = _table_of(path, folder) if data_format(path) and not name.startswith(".") else None
            if table:
                found[table][data_format(path)].append(path)
    preferred = FORMATS if _has_pyarrow() else FORMATS[1:] + FORMATS[:1]
    return {table: next(formats[name] for name in preferred if name in formats)
            for table, formats in found.items()}


def _has_pyarrow() -> bool:
    try:
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


def _parquet(path: Path, key: str):
    try:
        import pyarrow.parquet as parquet
    except ImportError:
        raise ConfigError(f"{key}: {path.name} is a parquet file, which needs pyarrow: pip install .[parquet] "
                          "(or pip install pyarrow), or use the CSV or NDJSON files of the same dump") from None
    return parquet


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _columns(path: Path, key: str = "") -> List[str]:
    """A table file's column names, read from its header (JSON: from its first row)."""
    kind = data_format(path)
    if kind == "parquet":
        return list(_parquet(path, key).read_schema(path).names)
    with _open_text(path) as handle:
        if kind == "csv":
            return next(csv.reader(handle), [])
        first = handle.readline().strip()
        row = json.loads(first.lstrip("[").rstrip(",]") or "{}") if first not in ("[", "") else {}
        return list(row) if isinstance(row, dict) else []


def read_rows(path: Path, columns: Sequence[str], key: str) -> Iterator[tuple]:
    """The rows of one table file as tuples of `columns` (None where a column is missing);
    a file that cannot be read is a ConfigError naming `key` and the file."""
    readers = {"parquet": _parquet_rows, "csv": _csv_rows}
    try:
        yield from readers.get(data_format(path), _json_rows)(path, columns, key)
    except (OSError, EOFError, UnicodeDecodeError, zlib.error, ValueError, csv.Error) as exc:
        text = str(exc).strip()
        reason = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
        raise ConfigError(f"{key}: cannot read {path}: {reason}") from None


def _parquet_rows(path: Path, columns: Sequence[str], key: str) -> Iterator[tuple]:
    parquet = _parquet(path, key)
    if path.name.lower().endswith(".gz"):  # parquet compresses itself, but a gzipped copy is read too
        import pyarrow

        table_file = parquet.ParquetFile(pyarrow.BufferReader(gzip.decompress(path.read_bytes())))
    else:
        table_file = parquet.ParquetFile(path)
    present = [name for name in columns if name in table_file.schema_arrow.names]
    _require(columns, present, path)
    for batch in table_file.iter_batches(columns=present, batch_size=8192):
        values = {name: _python(batch.column(name), name) for name in present}
        empty = [None] * batch.num_rows
        yield from zip(*(values.get(name, empty) for name in columns))


def _python(column, name: str) -> list:
    """A parquet column as Python values; `body` as the UTF-8 bytes the file holds, which is
    how FileSource keeps it (no string of each page is made and dropped)."""
    import pyarrow

    large = pyarrow.types.is_large_string(column.type)
    if name == "body" and (large or pyarrow.types.is_string(column.type)):
        return column.cast(pyarrow.large_binary() if large else pyarrow.binary()).to_pylist()
    return column.to_pylist()


def _csv_rows(path: Path, columns: Sequence[str], key: str) -> Iterator[tuple]:
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        _require(columns, header, path)
        where = [header.index(name) if name in header else None for name in columns]
        for row in reader:
            yield tuple(row[index] if index is not None and index < len(row) else None for index in where)


def _json_rows(path: Path, columns: Sequence[str], key: str) -> Iterator[tuple]:
    with _open_text(path) as handle:
        start = handle.read(1)
        while start.isspace():
            start = handle.read(1)
        rows = json.loads(start + handle.read()) if start == "[" else _json_lines(start, handle)
        for row in rows:
            if isinstance(row, dict):
                yield tuple(row.get(name) for name in columns)


def _json_lines(start: str, handle: io.TextIOBase) -> Iterator[object]:
    for number, line in enumerate(itertools.chain([start + handle.readline()], handle), 1):
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError as exc:
                raise ValueError(f"line {number} is not JSON ({exc})") from None


def _require(columns: Sequence[str], present: Sequence[str], path: Path) -> None:
    required = columns[:1] if columns[0] == "name" else columns[:2]
    missing = [name for name in required if name not in present]
    if missing:
        raise ValueError(f"no {' or '.join(missing)} column (it has {', '.join(present) or 'none'})")


def truthy(value: object) -> bool:
    """Booleans as dumps write them: `true`, `True`, `t`, `1`."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "t", "1", "yes")
    return bool(value)


def name_list(value: object) -> List[str]:
    """`other_names` as dumps write them: a list, a JSON or Python list in text, a Postgres
    array (`{a,b}`) or names separated by spaces."""
    if isinstance(value, (list, tuple)):
        return [str(name) for name in value if name]
    if not isinstance(value, str) or not value.strip():
        return []
    text = value.strip()
    if text.startswith("["):
        for parse in (json.loads, ast.literal_eval):
            try:
                parsed = parse(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
            return name_list(parsed) if isinstance(parsed, list) else []
        return []
    if text.startswith("{") and text.endswith("}"):
        return [name for name in next(csv.reader([text[1:-1]]), []) if name]
    return text.split()


def dated(paths: List[Path]) -> str:
    """The dump's date: one written in its file name, else the day the file was saved."""
    for path in paths:
        found = re.search(r"(20\d\d)-?(\d\d)-?(\d\d)", path.name)
        if found:
            return "-".join(found.groups())
    try:
        return time.strftime("%Y-%m-%d", time.gmtime(paths[0].stat().st_mtime))
    except OSError:
        return ""
