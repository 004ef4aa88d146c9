"""The folder remembers how it was captioned.

The settings that decide what a folder holds — `recursive`, where tags come from, where
captions go and in what formats — are kept in the images folder's `.tagcaption/settings.json`
by every run that writes, so `report`, `--retry-failed` and a plain rerun on that folder
work without repeating them. A value given now (on the command line, or in a `--config`
file of your own) overrides a remembered one, with one line saying so; the shipped
defaults never do.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Dict, Iterable

from tagcaption.files import atomic_write_text, read_regular
from tagcaption.layout import STATE_DIR

log = logging.getLogger("caption")

REMEMBERED = ("recursive", "tags_extension", "tags.sources", "output.dir", "output.extension", "output.formats")
SETTINGS_FILE = "settings.json"


def _get(config, key: str) -> Any:
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return list(value) if isinstance(value, (list, tuple)) else value


def _set(config, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    target = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, last, value)


def _as_given(config, key: str) -> Any:
    value = _get(config, key)
    if key == "output.dir" and value:
        return str(config.path(value))
    return value


def remember(config, layout) -> None:
    """Keep this run's folder settings in the images folder (a run that writes calls it)."""
    settings = {key: _as_given(config, key) for key in REMEMBERED}
    atomic_write_text(layout.settings, json.dumps(settings, indent=1, sort_keys=True) + "\n")


def recall(config, given: Iterable[str]) -> None:
    """Apply the settings remembered for `config.images_dir`, except the keys in `given`."""
    if not config.images_dir:
        return
    path = Path(config.images_dir) / STATE_DIR / SETTINGS_FILE
    try:
        remembered: Dict[str, Any] = json.loads(read_regular(path).decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(remembered, dict):
        return
    given = set(given)
    for key in REMEMBERED:
        if key not in remembered:
            continue
        value, now = remembered[key], _as_given(config, key)
        if value == now:
            continue
        if key in given:
            log.warning("note: %s=%s given now; this folder was last captioned with %s=%s", key, _show(now), key,
                        _show(value))
        elif _fits(config, key, value):
            _set(config, key, value)
            log.warning("note: %s=%s, as this folder was last captioned (give %s=… to change it)", key,
                        _show(value), key)


def _fits(config, key: str, value: Any) -> bool:
    """A remembered value of the type the key takes (a hand-edited file may hold anything)."""
    current = _get(config, key)
    if isinstance(current, bool) or isinstance(value, bool):
        return isinstance(current, bool) and isinstance(value, bool)
    if isinstance(current, list):
        return isinstance(value, list) and all(isinstance(item, str) for item in value)
    return value is None or isinstance(value, str)


def _show(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)
