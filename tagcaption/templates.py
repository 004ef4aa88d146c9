"""Prompt templates with `{name}` placeholders, filled safely.

Only plain names are allowed (`{tags}`, not `{tags.x}`, `{0}` or `{tags!r}`), every name
must be one the stage provides, and values are inserted literally: a tag or description
containing `{`, `}` or `{0.__class__}` can never be interpreted. `{{` and `}}` write
literal braces. Problems are found when the template is loaded, before any request.

No heading is sent with nothing under it: a paragraph (lines between blank lines) made
only of a heading line ending with `:` and lines that are each one placeholder is left out
when every one of those placeholders is empty. A paragraph holding any other text is kept.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import FrozenSet, Iterable, List, Optional, Tuple, Union

from tagcaption.errors import ConfigError, os_error_text

Piece = Union[str, Tuple[str]]
BLANK_LINES = re.compile(r"(\n[ \t]*(?:\n[ \t]*)+)")
PLACEHOLDER_LINE = re.compile(r"[ \t]*\{([A-Za-z_]\w*)\}[ \t]*")


@dataclass(frozen=True)
class Paragraph:
    pieces: Tuple[Piece, ...]
    separator: str
    """The blank lines after it."""
    optional: Optional[FrozenSet[str]]
    """For a heading with placeholder lines under it: those placeholders (all empty: left out)."""


class Template:
    def __init__(self, text: str, allowed: Iterable[str], origin: str):
        self.origin = origin
        allowed = set(allowed)
        chunks = BLANK_LINES.split(text)
        self.paragraphs: List[Paragraph] = []
        for index in range(0, len(chunks), 2):
            body, separator = chunks[index], chunks[index + 1] if index + 1 < len(chunks) else ""
            self.paragraphs.append(Paragraph(tuple(self._parse(body, allowed)), separator, _optional(body)))

    def _parse(self, text: str, allowed: set) -> List[Piece]:
        pieces: List[Piece] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ConfigError(f"template {self.origin}: {exc} (write {{{{ and }}}} for literal braces)") from None
        for literal, name, spec, conversion in parsed:
            if literal:
                pieces.append(literal)
            if name is None:
                continue
            if spec or conversion or not name.isidentifier():
                raise ConfigError(f"template {self.origin}: placeholder {{{name}{'!' + conversion if conversion else ''}"
                                  f"{':' + spec if spec else ''}}} is not a plain name like {{tags}}")
            if name not in allowed:
                raise ConfigError(f"template {self.origin}: unknown placeholder {{{name}}}; "
                                  f"available: {', '.join('{' + a + '}' for a in sorted(allowed))}")
            pieces.append((name,))
        return pieces

    @classmethod
    def load(cls, path: Path, allowed: Iterable[str]) -> "Template":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ConfigError(os_error_text(exc, path, "template")) from None
        return cls(text, allowed, str(path))

    @property
    def names(self) -> set:
        return {piece[0] for paragraph in self.paragraphs for piece in paragraph.pieces if isinstance(piece, tuple)}

    def render(self, **values: str) -> str:
        out: List[str] = []
        dropped = False
        for paragraph in self.paragraphs:
            if paragraph.optional and not any(str(values.get(name) or "").strip() for name in paragraph.optional):
                dropped = True
                continue
            out += [piece if isinstance(piece, str) else str(values.get(piece[0], "")) for piece in paragraph.pieces]
            out.append(paragraph.separator)
        text = "".join(out)
        return text.rstrip() if dropped else text


def _optional(body: str) -> Optional[FrozenSet[str]]:
    """The placeholders of a heading-and-placeholders paragraph, or None for any other."""
    lines = body.strip("\n").split("\n")
    if len(lines) < 2 or not lines[0].rstrip().endswith(":") or "{" in lines[0].replace("{{", ""):
        return None
    names = []
    for line in lines[1:]:
        match = PLACEHOLDER_LINE.fullmatch(line)
        if not match:
            return None
        names.append(match.group(1))
    return frozenset(names)
