"""The terminal: every message of a run goes through one logging handler, which prints it
above the progress bars (never through them), removes secrets, and groups repeats.

A message logged with `extra={"group": KEY, "item": NAME, "summary": TEXT}` belongs to a
group of its kind (a tag without summary, an image failed for the same reason…): the first
GROUP_SHOWN of a group are printed as they come, the rest are counted, and at the end one
line says how many there were in all, names the first few and where the full list is.
A closed stderr (a pipe to `head` that ended) loses lines, never prints a traceback.
"""
from __future__ import annotations

import logging
import re
import sys
import threading
import warnings
from dataclasses import dataclass, field
from typing import Dict, List

from tqdm import tqdm

from tagcaption.sinks import redact

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")
GROUP_SHOWN = 3
NAMES_SHOWN = 5


@dataclass
class _Group:
    summary: str
    count: int = 0
    names: List[str] = field(default_factory=list)


class TerminalHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.groups: Dict[str, _Group] = {}
        self._lock_groups = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        key = getattr(record, "group", None)
        if key is not None and not self._first_of_group(record, key):
            return
        self._write(self.format(record))

    def _first_of_group(self, record: logging.LogRecord, key: str) -> bool:
        with self._lock_groups:
            group = self.groups.setdefault(key, _Group(getattr(record, "summary", "{count} more like it")))
            group.count += 1
            if len(group.names) < NAMES_SHOWN + GROUP_SHOWN:
                group.names.append(str(getattr(record, "item", "")))
            return group.count <= GROUP_SHOWN

    def _write(self, text: str) -> None:
        text = CONTROL.sub(lambda match: repr(match.group())[1:-1], text)  # a file name cannot forge a line
        try:
            tqdm.write(redact(text), file=sys.stderr)
        except (OSError, ValueError):
            pass

    def flush_groups(self) -> None:
        """One line for each group that had more than was shown."""
        with self._lock_groups:
            groups, self.groups = self.groups, {}
        for group in groups.values():
            if group.count <= GROUP_SHOWN:
                continue
            hidden = group.names[GROUP_SHOWN:GROUP_SHOWN + NAMES_SHOWN]
            more = ", …" if group.count > GROUP_SHOWN + len(hidden) else ""
            self._write(f"{group.summary.format(count=group.count)} — {GROUP_SHOWN} shown above; also "
                        f"{', '.join(hidden)}{more}")

    def handleError(self, record: logging.LogRecord) -> None:
        """A line that cannot be written is lost; no traceback."""


def log_to_terminal(debug: bool) -> TerminalHandler:
    handler = TerminalHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("caption")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    logger.propagate = False
    # Pillow's UserWarnings ("Corrupt EXIF data", "Truncated File Read") change nothing here: a
    # damaged EXIF block counts as no orientation, and a truncated image fails when it is read.
    warnings.filterwarnings("ignore", category=UserWarning, module="PIL")
    warnings.showwarning = _one_line_warning
    return handler


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning (Pillow's "Corrupt EXIF data", "Truncated File Read"…) as one line."""
    text = " ".join(redact(str(message)).split())
    logging.getLogger("caption").warning(f"warning: {text}", extra={
        "group": f"{category.__name__}:{text[:40]}", "item": text[:60],
        "summary": f"warning: {{count}} {category.__name__}s from the image library"})
