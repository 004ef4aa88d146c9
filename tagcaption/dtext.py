"""Danbooru DText, the markup of wiki pages, as the plain text a reader of the rendered page
sees: what a tag summary is made from."""
from __future__ import annotations

import html
import re
from typing import List, Optional

_LITERAL_BLOCKS = re.compile(
    r"\[nodtext\](.*?)\[/nodtext\]|<nodtext>(.*?)</nodtext>|\[code\](.*?)\[/code\]|<code>(.*?)</code>"
    r"|^```[^\n]*\n(.*?)\n```[ \t]*$",
    re.DOTALL | re.IGNORECASE | re.MULTILINE)
_WIKI_LINK = re.compile(r"\[\[([^\]|]+?)(?:\|([^\]]*))?\]\]")
_POST_SEARCH = re.compile(r"\{\{([^}|]+?)(?:\|([^}]*))?\}\}")
_QUOTED_LINK = re.compile(r'"([^"\n]+)":(?:\[[^\]\s]+\]|(?:[a-z]+://|[/#])[^\s<>"]*[^\s<>".,;:!?)\]])',
                          re.IGNORECASE)
"""`"label":[target]`, `"label":https://…` and the relative `"label":/posts?tags=x` or `"label":#anchor`:
the label is what the reader sees; a trailing full stop or comma stays in the sentence."""
_MARKDOWN_LINK = re.compile(r"\[([^\]\n]+)\]\((?:[a-z]+://|/)[^)\s]*\)", re.IGNORECASE)
_URL_TAG = re.compile(r"\[url=[^\]]*\](.*?)\[/url\]", re.IGNORECASE | re.DOTALL)
_BARE_URL_TAG = re.compile(r"\[url\](.*?)\[/url\]", re.IGNORECASE | re.DOTALL)
_ANGLE_URL = re.compile(r"<([a-z]+://[^>\s]+)>", re.IGNORECASE)
_EMBED_LINE = re.compile(r"^[ \t]*!(?:post|asset) #\d+[^\n]*$", re.IGNORECASE | re.MULTILINE)
_HEADER = re.compile(r"^[ \t]*h([1-6])(?:#[\w-]+)?\.[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
_LIST_ITEM = re.compile(r"^[ \t]*(\*+)[ \t]+", re.MULTILINE)
_EXPAND_TITLE = re.compile(r"\[expand=([^\]]*)\]|<expand=([^>]*)>", re.IGNORECASE)
_TABLE_CELL_END = re.compile(r"\[/t[dh]\]|</t[dh]>", re.IGNORECASE)
_TABLE_ROW_END = re.compile(r"\[/tr\]|</tr>", re.IGNORECASE)
_BREAK = re.compile(r"\[br\]|<br\s*/?>|\[hr\]|<hr\s*/?>", re.IGNORECASE)
_BLOCK_TAGS = re.compile(r"\[/?(?:quote|expand|table)\]|</?(?:quote|expand|table)>",
                         re.IGNORECASE)
_TABLE_TAGS = re.compile(r"\[/?(?:thead|tbody|tr|td|th|col|colgroup)\]|</?(?:thead|tbody|tr|td|th|col|colgroup)>",
                         re.IGNORECASE)
_INLINE_TAGS = re.compile(r"\[/?(?:b|i|u|s|tn|sup|sub|center|spoilers?)\]"
                          r"|</?(?:b|strong|i|em|u|s|tn|sup|sub|spoilers?)>",
                          re.IGNORECASE)


def _link_text(target: str, shown: Optional[str]) -> str:
    target = target.strip()
    if shown is None:
        return target.split("#", 1)[0].replace("_", " ").strip()
    if shown.strip():
        return shown.strip()
    # The pipe trick: "[[Kaga (Kantai Collection)|]]" shows "Kaga".
    return re.sub(r"\s*\([^)]*\)\s*$", "", target.split("#", 1)[0]).replace("_", " ").strip()


def _clean_line(line: str) -> str:
    indent = re.match(r"[ \t]*", line).group() if re.match(r"[ \t]*- ", line) else ""
    return indent + re.sub(r"[ \t]+", " ", line).strip().rstrip("|").strip()


def dtext_to_text(body: str) -> str:
    """Danbooru DText as the plain text a reader of the rendered page sees, without markup."""
    literals: List[str] = []

    def keep_literal(match: re.Match) -> str:
        literals.append(next(group for group in match.groups() if group is not None))
        return f"\x00{len(literals) - 1}\x00"

    text = body.replace("\r\n", "\n")
    text = _LITERAL_BLOCKS.sub(keep_literal, text)
    text = _EMBED_LINE.sub("", text)
    text = _WIKI_LINK.sub(lambda m: _link_text(m.group(1), m.group(2)), text)
    text = _POST_SEARCH.sub(lambda m: (m.group(2) or m.group(1).replace("_", " ")).strip(), text)
    text = _URL_TAG.sub(r"\1", text)
    text = _BARE_URL_TAG.sub(r"\1", text)
    text = _QUOTED_LINK.sub(r"\1", text)
    text = _MARKDOWN_LINK.sub(r"\1", text)
    text = _ANGLE_URL.sub(r"\1", text)
    text = _HEADER.sub(lambda m: m.group(2).strip(), text)
    text = _LIST_ITEM.sub(lambda m: "  " * (len(m.group(1)) - 1) + "- ", text)
    text = _EXPAND_TITLE.sub(lambda m: (m.group(1) or m.group(2) or "").strip() + "\n", text)
    text = _TABLE_CELL_END.sub(" | ", text)
    text = _TABLE_ROW_END.sub("\n", text)
    text = _BREAK.sub("\n", text)
    text = _BLOCK_TAGS.sub("\n", text)
    text = _TABLE_TAGS.sub("", text)
    text = _INLINE_TAGS.sub("", text)
    text = html.unescape(text)
    text = re.sub(r"\x00(\d+)\x00", lambda m: literals[int(m.group(1))], text)
    lines = [_clean_line(line) for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_SECTION_HEADER = re.compile(r"^[ \t]*h[1-6](?:#[\w-]+)?\.[ \t]*(.*)$", re.IGNORECASE | re.MULTILINE)
_NOISE_SECTIONS = re.compile(r"^(see also|external links?|links|related tags?|related|tag groups?|"
                             r"references?|sources?|notes? for taggers|tagging notes?)\b", re.IGNORECASE)
_LINK_ONLY_ITEM = re.compile(r"^[ \t]*\*+[ \t]*(?:\[\[[^\]]*\]\][ \t,;/]*|\{\{[^}]*\}\}[ \t,;/]*)+(?:\n|\Z)", re.MULTILINE)


def wiki_text_for_summary(body: str, max_chars: int = 1500) -> str:
    """The part of a wiki page that says what the tag means, as plain text, at most
    `max_chars` long: "See also", "External links" and tag-group sections, and list items
    that are nothing but links to other tags, are left out."""
    kept, skipping, position = [], False, 0
    for header in _SECTION_HEADER.finditer(body):
        if not skipping:
            kept.append(body[position:header.start()])
        skipping = bool(_NOISE_SECTIONS.match(header.group(1).strip()))
        position = header.start()
    if not skipping:
        kept.append(body[position:])
    text = dtext_to_text(_LINK_ONLY_ITEM.sub("", "".join(kept)))
    if max_chars and len(text) > max_chars:
        cut = text[:max_chars]
        boundary = max(cut.rfind(". "), cut.rfind("\n"))
        text = (cut[:boundary + 1] if boundary > max_chars // 2 else cut).rstrip()
    return text
