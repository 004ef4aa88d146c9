"""Cleaning a model's answer into a caption: a small ordered pipeline, each step switchable
under `postprocess` in the config. Reasoning blocks are already gone (llm.clean_reply)."""
from __future__ import annotations

import bisect
import re
from typing import Any

from tagcaption.config import PostprocessConfig

_PREAMBLE = re.compile(
    r"^\s*(?:(?:sure|certainly|of course|absolutely|okay|ok|alright)\b[!,.]*\s*)?"
    r"(?:(?:here(?:'s| is| are)|below is)\b[^:\n]{0,80}?\b(?:caption|description|prompt|tags?|post|"
    r"analysis|listing|version)\b[^:\n]{0,40}:\s*|"
    r"(?:sure|certainly|of course|absolutely)[!.,]\s+)",
    re.IGNORECASE)
_IMAGE_SHOWS = re.compile(r"^\s*(?:the|this) (?:image|picture|photo(?:graph)?|illustration|artwork) "
                          r"(?:shows|depicts|features|portrays|captures|presents|displays)\s+", re.IGNORECASE)
_LABEL = re.compile(r"^\s*(?:\*\*)?(?:caption|description|prompt)(?:\*\*)?\s*:\s*(?:\*\*)?\s*", re.IGNORECASE)
_QUOTES = (('"', '"'), ("“", "”"), ("'", "'"), ("‘", "’"), ("«", "»"))


_HEADING = re.compile(r"^#{1,6}\s+", re.MULTILINE)
_STRONG = re.compile(r"(\*\*|__)(.+?)\1")
_EMPHASIS_OPEN = re.compile(r"(?<![\w*])\*(?=\S)")
_EMPHASIS_CLOSE = re.compile(r"(?<=\S)\*(?![\w*])")
_CODE = re.compile(r"`([^`]*)`")
_LIST_MARK = re.compile(r"^[^\S\n]*(?:[-*+]|\d+\.)\s+", re.MULTILINE)
"""A list item's marker after its line's own indentation (a blank line before it is kept)."""


def strip_markdown(text: str) -> str:
    """Headings, bold, emphasis, code and list markers off, in one pass each: no pattern
    here scans the rest of a line again for every unclosed `*` or every blank line."""
    text = _HEADING.sub("", text)
    text = _STRONG.sub(r"\2", text)
    text = strip_emphasis(text)
    text = _CODE.sub(r"\1", text)
    return _LIST_MARK.sub("", text)


def strip_emphasis(text: str) -> str:
    """`*word*` → `word`: an opening `*` (not after a letter or `*`, before a non-space)
    pairs with the first closing one (after a non-space, not before a letter or `*`) at
    least two characters on in the same line. The closing ones are found once, not again
    for every opening one."""
    closers = [match.start() for match in _EMPHASIS_CLOSE.finditer(text)]
    line_ends = [match.start() for match in re.finditer("\n", text)] + [len(text)]
    kept, position = [], 0
    for opening in _EMPHASIS_OPEN.finditer(text):
        start = opening.start()
        if start < position:
            continue
        index = bisect.bisect_left(closers, start + 2)
        if index == len(closers) or closers[index] > line_ends[bisect.bisect_left(line_ends, start)]:
            continue
        kept += [text[position:start], text[start + 1:closers[index]]]
        position = closers[index] + 1
    return "".join(kept) + text[position:]


def strip_quotes(text: str) -> str:
    text = text.strip()
    for opening, closing in _QUOTES:
        if len(text) > 1 and text.startswith(opening) and text.endswith(closing) \
                and opening not in text[1:-1] and closing not in text[1:-1]:
            return text[1:-1].strip()
    return text


def cap_words(text: str, max_words: int) -> str:
    """At most `max_words` words, cut after the last whole sentence that fits (or at a word)."""
    words = text.split()
    if len(words) <= max_words:
        return text
    cut = " ".join(words[:max_words])
    end = max(cut.rfind(". "), cut.rfind("! "), cut.rfind("? "))
    if cut.endswith((".", "!", "?")):
        return cut
    return cut[:end + 1] if end > 0 else cut


NOT_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")
"""Control characters (all but tab and newline) and bidi embeddings, overrides, isolates and
marks: a caption is text a trainer reads, never a way to hide or reorder what it says."""


ESCAPE_SEQUENCE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")
"""Terminal escape sequences (colours, cursor moves, titles): removed whole, not just the ESC."""


SURROGATE_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
SURROGATE = re.compile("[\ud800-\udfff]")
"""UTF-16 halves: a stream that sends an emoji's two halves in two events (each escaped in its
own JSON) joins them as two characters, and a half alone cannot be written as UTF-8 at all."""


def whole_characters(text: str) -> str:
    """`text` with each pair of surrogates made the one character it stands for and any lone
    one dropped (a U+FFFD of the reply's own is kept)."""
    if not SURROGATE.search(text):
        return text
    text = SURROGATE_PAIR.sub(lambda pair: pair.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le"),
                              text)
    return SURROGATE.sub("", text)


def only_text(text: str) -> str:
    """What a caption may hold: whole characters, no terminal escapes, control characters
    (but tab and newline) or bidi marks, one kind of line break."""
    text = ESCAPE_SEQUENCE.sub("", whole_characters(text))
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    return NOT_TEXT.sub("", text)


def only_text_values(value: Any) -> Any:
    """A structured caption's object with every text in it cleaned as a caption's is: no
    lone surrogates, control characters, bidi overrides or terminal escapes (only_text)."""
    if isinstance(value, str):
        return only_text(value)
    if isinstance(value, list):
        return [only_text_values(item) for item in value]
    if isinstance(value, dict):
        return {only_text(str(key)): only_text_values(item) for key, item in value.items()}
    return value


def clean_caption(text: str, settings: PostprocessConfig) -> str:
    text = only_text(text)
    if settings.strip_preamble:
        text = _PREAMBLE.sub("", text, count=1)
    if settings.strip_label:
        text = _LABEL.sub("", text, count=1)
    if settings.strip_markdown:
        text = strip_markdown(text)
    if settings.strip_quotes:
        text = strip_quotes(text)
    if settings.strip_image_shows:
        stripped = _IMAGE_SHOWS.sub("", text, count=1)
        text = stripped[:1].upper() + stripped[1:] if stripped != text else text
    if settings.collapse_whitespace:
        text = " ".join(text.split())
    if settings.max_words:
        text = cap_words(text, settings.max_words)
    return text.strip()


def add_affixes(text: str, prefix: str, suffix: str) -> str:
    """Add the trigger word(s) once: a caption that already has them is left as it is."""
    if prefix and not text.startswith(prefix):
        text = f"{prefix}{text}"
    if suffix and not text.endswith(suffix):
        text = f"{text}{suffix}"
    return text
