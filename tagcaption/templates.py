"""Prompt templates with `{name}` placeholders, filled safely.

Only plain names are allowed (`{tags}`, not `{tags.x}`, `{0}` or `{tags!r}`), every name
must be one the stage provides, and values are inserted literally: a tag or description
containing `{`, `}` or `{0.__class__}` can never be interpreted. `{{` and `}}` write
literal braces. Problems are found when the template is loaded, before any request.

No heading is sent with nothing under it: in a paragraph (lines between blank lines) made
only of a heading line ending with `:` and lines that are each one placeholder, alone or
after a label (`Characters: {character_names}`), a line whose placeholder is empty is left
out, and the whole paragraph when all of them are. A paragraph holding any other text is
sent as written.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from tagcaption.errors import ConfigError, os_error_text
from tagcaption.files import read_regular

Piece = Union[str, Tuple[str]]
BLANK_LINES = re.compile(r"(\n[ \t]*(?:\n[ \t]*)+)")
PLACEHOLDER_LINE = re.compile(r"[ \t]*(?:[^{}:\n]+:[ \t]*)?\{([A-Za-z_]\w*)\}[ \t]*")


@dataclass(frozen=True)
class Paragraph:
    pieces: Tuple[Piece, ...]
    separator: str
    """The blank lines after it."""
    optional: Optional[Tuple[Tuple[Tuple[Piece, ...], str], ...]]
    """For a heading with placeholder lines under it: each line's pieces and placeholder."""


class Template:
    def __init__(self, text: str, allowed: Iterable[str], origin: str):
        self.origin = origin
        allowed = set(allowed)
        chunks = BLANK_LINES.split(text)
        self.paragraphs: List[Paragraph] = []
        for index in range(0, len(chunks), 2):
            body, separator = chunks[index], chunks[index + 1] if index + 1 < len(chunks) else ""
            lines = _optional(body)
            optional = tuple((tuple(self._parse(line, allowed)), name) for line, name in lines) if lines else None
            self.paragraphs.append(Paragraph(tuple(self._parse(body, allowed)), separator, optional))

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
            text = read_regular(path).decode("utf-8-sig")
        except OSError as exc:
            raise ConfigError(os_error_text(exc, path, "template")) from None
        except UnicodeDecodeError:
            raise ConfigError(f"template {path} is not UTF-8 text") from None
        return cls(text, allowed, str(path))

    @property
    def names(self) -> set:
        return {piece[0] for paragraph in self.paragraphs for piece in paragraph.pieces if isinstance(piece, tuple)}

    def render(self, **values: str) -> str:
        out: List[str] = []
        dropped = False
        for paragraph in self.paragraphs:
            pieces = paragraph.pieces
            if paragraph.optional:
                kept = [(line, name) for line, name in paragraph.optional[1:] if str(values.get(name) or "").strip()]
                if not kept:
                    dropped = True
                    continue
                dropped |= len(kept) < len(paragraph.optional) - 1
                pieces = _joined([paragraph.optional[0][0]] + [line for line, _ in kept])
            out += [piece if isinstance(piece, str) else str(values.get(piece[0], "")) for piece in pieces]
            out.append(paragraph.separator)
        text = "".join(out)
        return text.rstrip() if dropped else text


def _joined(lines: List[Tuple[Piece, ...]]) -> List[Piece]:
    pieces: List[Piece] = []
    for index, line in enumerate(lines):
        if index:
            pieces.append("\n")
        pieces += line
    return pieces


def _optional(body: str) -> Optional[List[Tuple[str, str]]]:
    """For a heading-and-placeholders paragraph, its lines with each one's placeholder (the
    heading's is ""); None for any other paragraph."""
    lines = body.strip("\n").split("\n")
    if len(lines) < 2 or not lines[0].rstrip().endswith(":") or "{" in lines[0].replace("{{", ""):
        return None
    found = [(lines[0], "")]
    for line in lines[1:]:
        match = PLACEHOLDER_LINE.fullmatch(line)
        if not match:
            return None
        found.append((line, match.group(1)))
    return found
