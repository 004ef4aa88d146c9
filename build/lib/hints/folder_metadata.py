"""`metadata.json` in the image's folder, read once per folder, shown as `key: value` lines."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Optional


@lru_cache(maxsize=256)
def _read(folder: Path) -> Optional[str]:
    path = folder / "metadata.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    if isinstance(data, dict):
        lines = [f"{key}: {_flat(value)}" for key, value in data.items()]
        return "Folder metadata:\n" + "\n".join(lines) if lines else None
    return f"Folder metadata: {_flat(data)}"


def _flat(value) -> str:
    if isinstance(value, list):
        return ", ".join(_flat(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def hint(image) -> Optional[str]:
    return _read(image.path.parent)
