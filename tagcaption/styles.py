"""Caption style presets: `templates/styles/<name>.txt`, files users copy and edit.

A preset file holds up to three `key: text` lines — `any:` (no length asked), `length:`
(uses `{length}`) and `word_count:` (uses `{word_count}`) — and optionally
`output: tags_then_caption`. The chosen line, followed by the `style.extra_options`
sentences from `templates/styles/_extra_options.txt`, is the instruction. It is the whole
prompt when the Interrogator uses the preset (a captioning VLM such as JoyCaption), and
is put into `templates/styles/_interpreter.txt` as `{instruction}` when the Interpreter
uses it to rewrite tags, tag summaries and the description.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from tagcaption.config import DATA_DIR, Config
from tagcaption.errors import ConfigError, os_error_text
from tagcaption.vocabulary import CAPTION, STYLE_OUTPUTS

STYLES_DIR = "templates/styles"
LENGTHS = ("any", "very short", "short", "medium-length", "long", "very long")
OUTPUT_FORMATS = STYLE_OUTPUTS


@dataclass(frozen=True)
class Style:
    name: str
    lines: Dict[str, str]
    output: str = CAPTION


def _read_keyed_lines(path: Path) -> Dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(os_error_text(exc, path)) from None
    entries = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ConfigError(f"{path}: line {line[:40]!r} is not `key: text`")
        entries[key.strip()] = value.strip()
    return entries


def style_dir(config: Config) -> Path:
    return config.resource(STYLES_DIR)


def available_styles(config: Config) -> List[str]:
    folders = {style_dir(config), DATA_DIR / STYLES_DIR}
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.txt")
                   if not p.name.startswith("_")})


def load_style(config: Config, name: str) -> Style:
    path = config.resource(f"{STYLES_DIR}/{name}.txt")
    if not path.is_file():
        raise ConfigError(f"unknown style '{name}'; available: {', '.join(available_styles(config))}")
    lines = _read_keyed_lines(path)
    output = lines.pop("output", CAPTION)
    if output not in OUTPUT_FORMATS:
        raise ConfigError(f"{path}: output must be one of {', '.join(OUTPUT_FORMATS)}")
    if "any" not in lines:
        raise ConfigError(f"{path}: needs at least an `any:` line")
    return Style(name, lines, output)


def extra_options(config: Config) -> Dict[str, str]:
    return _read_keyed_lines(config.resource(f"{STYLES_DIR}/_extra_options.txt"))


def instruction(style: Style, length: str = "any", word_count: Optional[int] = None,
                options: List[str] = (), option_texts: Optional[Dict[str, str]] = None) -> str:
    """The instruction a preset gives for a length or word count and extra options.

    `{name}` stays a placeholder, filled per image like any other."""
    length = (length or "any").strip()
    if word_count is None and re.fullmatch(r"\d+", length):
        word_count, length = int(length), "any"
    if word_count is not None and "word_count" in style.lines:
        text = style.lines["word_count"].replace("{word_count}", str(word_count))
    elif length != "any" and "length" in style.lines:
        text = style.lines["length"].replace("{length}", length)
    else:
        text = style.lines["any"]
    texts = option_texts or {}
    unknown = [option for option in options if option not in texts]
    if unknown:
        raise ConfigError(f"style.extra_options: unknown option(s) {', '.join(unknown)}; "
                          f"available: {', '.join(texts)}")
    return " ".join([text] + [texts[option] for option in options])


def check_length(length: str) -> None:
    if length not in LENGTHS and not re.fullmatch(r"\d+", str(length).strip()):
        raise ConfigError(f"style.length must be one of {', '.join(LENGTHS)} or a number of words (got {length!r})")
