"""A JSON file beside the image (`<image file name>.json` from gallery-dl, or `<stem>.json`).

A gallery-dl Danbooru sidecar is shown as characters / copyright / artist / rating; any
other JSON object as `key: value` lines (long values shortened, the whole block capped).
"""
from __future__ import annotations

import json
from typing import List, Optional

from tagcaption.tagfiles import decode_text, sidecar_paths
from tagcaption.vocabulary import RATINGS

MAX_VALUE = 200
MAX_BLOCK = 1500


def hint(image) -> Optional[str]:
    for path in sidecar_paths(image.path, getattr(image, "not_sidecar", None)):
        if path.is_file():
            data = json.loads(decode_text(path.read_bytes()))
            return _booru(data) or _generic(data)
    return None


def _names(value) -> str:
    names = value.split() if isinstance(value, str) else value if isinstance(value, list) else []
    return ", ".join(str(name).replace("_", " ") for name in names)


def _booru(data) -> Optional[str]:
    if not isinstance(data, dict) or not any(key.startswith(("tag_string_", "tags_")) for key in data):
        return None
    lines: List[str] = []
    for label, key in (("Characters", "character"), ("Copyright", "copyright"), ("Artist", "artist")):
        names = _names(data.get(f"tag_string_{key}") or data.get(f"tags_{key}"))
        if names:
            lines.append(f"{label}: {names}")
    rating = data.get("rating")
    if isinstance(rating, str) and rating:
        lines.append(f"Rating: {RATINGS.get(rating, rating)}")
    return "\n".join(lines) or None


def _generic(data) -> Optional[str]:
    if not isinstance(data, dict):
        return None
    lines = []
    for key, value in data.items():
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
        if text in ("", "null", "[]", "{}"):
            continue
        lines.append(f"{key}: {text if len(text) <= MAX_VALUE else text[:MAX_VALUE - 1] + '…'}")
    block = "\n".join(lines)
    return ("Metadata:\n" + block[:MAX_BLOCK]) if block else None
