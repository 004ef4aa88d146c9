"""Character, copyright and artist tags as the names people write: `hatsune_miku` →
"Hatsune Miku", `kaga_(kantai_collection)` → "Kaga (Kantai Collection)", and, where the wiki
page's other names write the name with its own letters (`wlop` → "WLOP",
`the_idolm@ster` → "THE iDOLM@STER"), that spelling.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Tuple

NAMED_CATEGORIES = ("character", "copyright", "artist")
"""The categories whose tags are also given to prompts as names (`{character_names}`…)."""

_QUALIFIED = re.compile(r"^(.+?)_\(([^()]+)\)$")
_MINOR_WORDS = frozenset("a an and as at by for from in of on or the to vs with no na wo ga ni de".split())
"""Written in lower case inside a name (`Shingeki no Kyojin`, `The Legend of Zelda`)."""
_GENERIC_QUALIFIERS = frozenset({"artist", "series", "franchise", "character", "copyright"})
"""Qualifiers that only say what kind of tag it is (`kei_(artist)`): left out of the name."""
_ROMAN = re.compile(r"^(?=[ivx]{2,}$)x{0,3}(ix|iv|v?i{0,3})$")
_WORD_START = re.compile(r"(^|[-/:;.!?&+])([a-z])")


def split_qualifier(tag: str) -> Tuple[str, Optional[str]]:
    """`kaga_(kantai_collection)` → (`kaga`, `kantai_collection`); `hatsune_miku` → (`hatsune_miku`, None)."""
    match = _QUALIFIED.match(tag)
    return (match.group(1), match.group(2)) if match else (tag, None)


def _key(text: str) -> str:
    return " ".join(text.replace("_", " ").lower().split())


def title_case(slug: str) -> str:
    """`shingeki_no_kyojin` → "Shingeki no Kyojin", `fate/grand_order` → "Fate/Grand Order",
    `final_fantasy_vii` → "Final Fantasy VII"."""
    words = []
    for index, word in enumerate(slug.replace("_", " ").split()):
        if _ROMAN.match(word):
            words.append(word.upper())
        elif index and word in _MINOR_WORDS:
            words.append(word)
        else:
            words.append(_WORD_START.sub(lambda m: m.group(1) + m.group(2).upper(), word))
    return " ".join(words)


def spelling(tag: str, other_names: Sequence[str]) -> Optional[str]:
    """The wiki's other name that writes the tag (whole, or without its qualifier) with its own
    capitals, with spaces for underscores; None when no other name does."""
    base, _ = split_qualifier(tag)
    for wanted in (_key(tag), _key(base)):
        for name in other_names:
            written = " ".join(str(name).replace("_", " ").split())
            if _key(written) == wanted and written != written.lower():
                return written
    return None


def display_name(tag: str, written: Optional[str] = None) -> str:
    """How a prompt names the tag; `written` is its `spelling`, when the wiki gave one."""
    base, qualifier = split_qualifier(tag)
    if written and _key(written) == _key(tag):
        return written
    name = written or title_case(base)
    if qualifier and qualifier.lower() not in _GENERIC_QUALIFIERS:
        name = f"{name} ({title_case(qualifier)})"
    return name
