"""Prompt templates with `{name}` placeholders, filled safely.

Only plain names are allowed (`{tags}`, not `{tags.x}`, `{0}` or `{tags!r}`), every name
must be one the stage provides, and values are inserted literally: a tag or description
containing `{`, `}` or `{0.__class__}` can never be interpreted. `{{` and `}}` write
literal braces. Problems are found when the template is loaded, before any request.
"""
from __future__ import annotations

import string
from pathlib import Path
from typing import Iterable, List, Tuple, Union

from tagcaption.errors import ConfigError, os_error_text

Piece = Union[str, Tuple[str]]


class Template:
    def __init__(self, text: str, allowed: Iterable[str], origin: str):
        self.origin = origin
        self.pieces: List[Piece] = []
        allowed = set(allowed)
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ConfigError(f"template {origin}: {exc} (write {{{{ and }}}} for literal braces)") from None
        for literal, name, spec, conversion in parsed:
            if literal:
                self.pieces.append(literal)
            if name is None:
                continue
            if spec or conversion or not name.isidentifier():
                raise ConfigError(f"template {origin}: placeholder {{{name}{'!' + conversion if conversion else ''}"
                                  f"{':' + spec if spec else ''}}} is not a plain name like {{tags}}")
            if name not in allowed:
                raise ConfigError(f"template {origin}: unknown placeholder {{{name}}}; "
                                  f"available: {', '.join('{' + a + '}' for a in sorted(allowed))}")
            self.pieces.append((name,))

    @classmethod
    def load(cls, path: Path, allowed: Iterable[str]) -> "Template":
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise ConfigError(os_error_text(exc, path, "template")) from None
        return cls(text, allowed, str(path))

    @property
    def names(self) -> set:
        return {piece[0] for piece in self.pieces if isinstance(piece, tuple)}

    def render(self, **values: str) -> str:
        return "".join(piece if isinstance(piece, str) else str(values.get(piece[0], ""))
                       for piece in self.pieces)
