"""The records of captioned images: one line per image (file, caption, tags, description,
model per stage, guard trips, time), always kept in `.tagcaption/records.jsonl` (the review
page reads it), and as the dataset files `output.formats` asks for: `captions.jsonl` at the
output root (the same lines) and Hugging Face imagefolder's `metadata.jsonl` (`file_name`,
`text`, `tags`, `description`).

Records of the run are appended to a journal in `.tagcaption/` as captions are written,
so a killed run loses none. At the end (and at the start of the next run, for a journal
left by a killed one) the journal is merged into the files: one line per image, the
newest winning, written atomically under a lock that runs sharing the folder respect.
"""
from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from tagcaption.files import atomic_write_text, json_text
from tagcaption.sinks import redact
from tagcaption.layout import Layout
from tagcaption.vocabulary import OUTPUT_FORMATS, TXT

FORMATS = OUTPUT_FORMATS


class DatasetOutputs:
    def __init__(self, formats: Iterable[str], layout: Layout):
        self.formats = set(formats)
        self.layout = layout
        self.journal = layout.journal
        self._lock = threading.Lock()

    def record(self, record: dict) -> None:
        """Keep one captioned image's record (called from the caption-writing thread)."""
        with self._lock:
            self.journal.parent.mkdir(exist_ok=True)
            with open(self.journal, "a", encoding="utf-8") as handle:
                handle.write(redact(json_text(record)) + "\n")

    def merge(self) -> None:
        """Fold the journal into the records and the dataset files, then drop it."""
        if not self.journal.exists():
            return
        records = _read_jsonl(self.journal)
        with open(self.layout.outputs_lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._merge_into(self.layout.records, records, "file", lambda r: r)
            if "jsonl" in self.formats:
                self._merge_into(self.layout.captions_jsonl, records, "file", lambda r: r)
            if "metadata" in self.formats:
                self._merge_into(self.layout.metadata_jsonl, records, "file_name", _metadata_line)
        self.journal.unlink(missing_ok=True)

    @staticmethod
    def _merge_into(path: Path, records: List[dict], key: str, shape) -> None:
        lines: Dict[str, dict] = {line.get(key): line for line in _read_jsonl(path) if line.get(key)}
        for record in records:
            line = shape(record)
            if shape is _metadata_line:  # a column of the user's own (`aesthetic`, `source`) stays
                line = {**{k: v for k, v in lines.get(line[key], {}).items() if k not in METADATA_KEYS}, **line}
            lines[line[key]] = line
        atomic_write_text(path, "".join(json_text(line) + "\n"
                                        for _, line in sorted(lines.items())))


METADATA_KEYS = ("file_name", "text", "variants", "tags", "description")
"""The columns of metadata.jsonl this program writes; any other in a line is the user's."""


def _metadata_line(record: dict) -> dict:
    line = {"file_name": record["file"], "text": record["caption"]}
    if isinstance(record.get("variants"), list):
        line["variants"] = record["variants"]
    if record.get("tags"):
        line["tags"] = record["tags"]
    if record.get("description"):
        line["description"] = record["description"]
    return line


def _read_jsonl(path: Path) -> List[dict]:
    if not path.exists():
        return []
    lines = []
    for text in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            continue  # a torn last line from a killed run
        if isinstance(value, dict):
            lines.append(value)
    return lines


def read_records(path: Path) -> List[dict]:
    return _read_jsonl(path)


def check_formats(formats: Iterable[str]) -> Optional[str]:
    """What is wrong with an `output.formats` list, if anything (load_config rejects it)."""
    formats = list(formats)
    unknown = [name for name in formats if name not in FORMATS]
    if unknown:
        return f"output.formats: unknown format(s) {', '.join(unknown)} (use {', '.join(FORMATS)})"
    if TXT not in formats:
        return "output.formats must include txt: the per-image caption files are how a rerun knows what is done"
    return None
