"""Hint sources: short blocks of per-image context for the prompts (`{hints}`).

A source is a module in this folder with a function `hint(image: HintInput) -> str | None`,
registered below by name. Names are listed in `interrogator.hint_sources`; the hints go
before the first vision prompt and to the Interpreter as `{hints}`. A source that fails
costs a warning, never the image.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from tagcaption.hints import exif, folder_metadata, full_path, generation_parameters, sidecar_json, tags

log = logging.getLogger("caption")


@dataclass(frozen=True)
class HintInput:
    path: Path
    rel: Path
    tags: Sequence[str]
    not_sidecar: Optional[Path] = None
    """A `<stem>.json` beside the image that is no sidecar: another image's structured caption."""


HintSource = Callable[[HintInput], Optional[str]]

HINT_SOURCES: Dict[str, HintSource] = {
    "full_path": full_path.hint,
    "folder_metadata": folder_metadata.hint,
    "tags": tags.hint,
    "sidecar_json": sidecar_json.hint,
    "generation_parameters": generation_parameters.hint,
    "exif": exif.hint,
}


def unknown_sources(names: List[str]) -> List[str]:
    return [name for name in names if name not in HINT_SOURCES]


def sources_problem(names: List[str]) -> Optional[str]:
    """The message for hint sources not registered above, if any (the one wording for it)."""
    unknown = unknown_sources(names)
    return f"interrogator.hint_sources: unknown source(s) {', '.join(unknown)}" if unknown else None


def collect_hints(names: List[str], image: HintInput) -> str:
    """The hints of the named sources, one block each, in the order given."""
    blocks = []
    for name in names:
        try:
            text = HINT_SOURCES[name](image)
        except Exception as exc:  # a hint is optional context: never lose the image over it
            log.warning("warning: hint source '%s' failed for %s: %s", name, image.rel, exc, extra={
                "group": f"hint:{name}", "item": str(image.rel),
                "summary": f"warning: hint source '{name}' failed for {{count}} images (they were captioned without it)"})
            continue
        if text and text.strip():
            blocks.append(text.strip())
    return "\n".join(blocks)
