"""What a caption says against its image's tags: another colour for the eyes or hair than the
one the tags give, more people than they count, or a phrase the table of opposites rules out.

Every rule would rather miss than accuse, since a false alarm costs a good caption: a colour
is checked only for one person with one eye (or hair) colour tag and no heterochromia or
multicoloured hair, and not when the caption also gives the tagged colour (it may be talking
about someone else); a count only against exact count tags (`2girls`, not `multiple_girls`),
only when the caption claims more people than tagged or one alone among several, and never in
a sentence about a picture, a poster, a reflection or the background, nor in a clause about a
print ("a T-shirt printed with two cartoon girls"); a negated phrase ("not frowning"), or one
naming a print or an accessory ("a long hair ribbon", "a night sky pattern"), never counts. See
docs/styles-and-guards.md for the limits.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

from tagcaption.errors import ConfigError, os_error_text
from tagcaption.files import read_regular
from tagcaption.tagfiles import display_tag, normalize_tag


@dataclass(frozen=True)
class Finding:
    says: str
    """One line for the record, the review page and a failure: "says blue eyes where the tags say red eyes"."""
    correction: str
    """For a follow-up turn that shows the model its caption."""
    requirement: str
    """For a fresh prompt, which has no caption to refer to."""


def against(tagged: str, said: str) -> Finding:
    return Finding(f"says {said} where the tags say {tagged}", f"The tags say {tagged}; the caption says {said}.",
                   f"The tags say {tagged}: do not write {said}.")


def fold(text: str) -> str:
    """Lower case, without accents (Pokémon → pokemon), underscores as spaces (a tag list in the caption)."""
    text = "".join(char for char in unicodedata.normalize("NFKD", text) if not unicodedata.combining(char))
    return text.lower().replace("_", " ").replace("\u2019", "'")


def phrase_pattern(phrase: str, plural: bool = False) -> re.Pattern:
    """`phrase` as whole words, any spaces or hyphens between them; with `plural`, its last
    word with or without a final s."""
    words = [re.escape(word) for word in re.split(r"[\s-]+", fold(phrase).strip()) if word]
    if plural and words and len(words[-1]) > 3 and words[-1].endswith("s") and not words[-1].endswith("ss"):
        words[-1] = words[-1][:-1] + "s?"
    elif plural and words:
        words[-1] += "s?"
    return re.compile(r"(?<!\w)" + r"[\s-]+".join(words) + r"(?!\w)")


_NEGATED = re.compile(r"(?:\b(?:not|no|without|never|nor|neither|lacks?|lacking|instead of|rather than)|n't)"
                      r"[\s,]+(?:[\w-]+\s+)?$")


def negated(text: str, start: int) -> bool:
    return bool(_NEGATED.search(text[max(0, start - 40):start]))


_ADORNING = re.compile(r"[\s-]*(?:ribbons?|ties?|bands?|clips?|pins?|bows?|ornaments?|accessory|accessories|"
                       r"patterns?|prints?|printed|motifs?|designs?|decorations?)(?!\w)")
"""Words after a phrase that make it a thing worn or printed: a long hair ribbon, a night sky pattern."""
_ADORNED = re.compile(r"(?:(?:printed|patterned|decorated|embroidered)\s+with|(?:print|pattern|motif|design)\s+of)"
                      r"\s+(?:(?:an?|the)\s+)?(?:[\w-]+\s+)?$")
"""Words before a phrase that do: printed with a night sky, a print of a city at night (not "a
picture of", which may be the caption's own opening)."""


def adorning(text: str, start: int, end: int) -> bool:
    """Whether the phrase at text[start:end] names a print, a pattern or an accessory, not the scene."""
    return bool(_ADORNING.match(text, end) or _ADORNED.search(text[max(0, start - 60):start]))


def mentioned(text: str, phrase: str) -> Optional[str]:
    """The first occurrence of `phrase` in folded `text` that is not negated, nor a print, a
    pattern or an accessory ("a long hair ribbon", "printed with a night sky")."""
    for match in phrase_pattern(phrase).finditer(text):
        if not negated(text, match.start()) and not adorning(text, match.start(), match.end()):
            return match.group()
    return None


# --- colours -------------------------------------------------------------------------------

COLOURS: Dict[str, FrozenSet[str]] = {word: frozenset(groups.split()) for word, groups in {
    "red": "red", "crimson": "red", "scarlet": "red", "ruby": "red", "vermilion": "red orange",
    "maroon": "red brown", "burgundy": "red purple", "orange": "orange", "amber": "orange yellow brown",
    "copper": "orange brown red", "ginger": "orange red", "yellow": "yellow", "golden": "yellow blonde orange",
    "gold": "yellow blonde orange", "blonde": "blonde", "blond": "blonde", "platinum": "blonde white grey",
    "green": "green", "emerald": "green", "jade": "green", "lime": "green", "olive": "green brown",
    "mint": "green aqua", "aqua": "aqua", "teal": "aqua", "turquoise": "aqua", "cyan": "aqua", "blue": "blue",
    "azure": "blue", "sapphire": "blue", "navy": "blue", "cobalt": "blue", "cerulean": "blue",
    "indigo": "blue purple", "purple": "purple", "violet": "purple", "lavender": "purple", "lilac": "purple",
    "amethyst": "purple", "magenta": "purple pink", "fuchsia": "pink purple", "pink": "pink", "rose": "pink red",
    "salmon": "pink orange", "coral": "pink orange", "brown": "brown", "hazel": "brown green",
    "chestnut": "brown", "chocolate": "brown", "auburn": "brown red", "bronze": "brown orange",
    "strawberry": "red blonde", "black": "black", "ebony": "black", "raven": "black", "grey": "grey", "gray": "grey",
    "silver": "grey white", "ash": "grey", "white": "white"}.items()}
"""Colour words and the colour groups each may name."""
NEIGHBOURS = {frozenset(pair.split()) for pair in (
    "red pink", "red orange", "red brown", "orange yellow", "orange brown", "yellow blonde", "yellow brown",
    "yellow green", "green aqua", "aqua blue", "blue purple", "blue grey", "purple pink", "grey white",
    "grey black", "black brown", "blonde white", "blonde brown")}
"""Groups close enough that a caption may fairly call one the other (aqua eyes described as blue)."""
PARTS = {"eyes": ("eyes", "eye", "eyed"), "hair": ("hair", "haired")}
MIXED = {"eyes": {"heterochromia", "multicolored_eyes", "gradient_eyes", "mismatched_pupils"},
         "hair": {"multicolored_hair", "two-tone_hair", "gradient_hair", "streaked_hair", "colored_inner_hair",
                  "split-color_hair", "rainbow_hair", "colored_tips", "hair_dye"}}
"""Tags after which no single colour holds for the part."""
_NOT_THE_PART = {"eyes": {"shadow", "shadows", "liner", "patch", "patches", "mask", "makeup", "lashes", "brow",
                          "brows"},
                 "hair": {"ribbon", "ribbons", "bow", "bows", "ornament", "ornaments", "clip", "clips", "band",
                          "bands", "tie", "ties", "pin", "pins", "flower", "flowers", "accessory", "accessories",
                          "bobble", "bobbles", "scrunchie", "scrunchies", "tube", "tubes", "ring", "rings", "stick",
                          "sticks", "bead", "beads", "comb", "dryer", "brush", "net", "decoration", "decorations"}}
"""Words after the part that make it another thing: a red hair ribbon says nothing of the hair."""
_DESCRIBING = {"long", "short", "wavy", "curly", "straight", "messy", "flowing", "silky", "shiny", "light", "dark",
               "bright", "pale", "deep", "vivid", "glowing", "large", "big", "sparkling", "soft", "striking",
               "shoulder", "length", "medium", "waist", "hip", "spiky", "fluffy", "tied", "braided", "thick"}
_TAG_COLOUR = re.compile(r"^(?:(?:light|dark|pale)_)?([a-z]+)_(eyes|hair)$")
_WORD = re.compile(r"[a-z]+")
_CLAUSE_MARK = re.compile("[.,;:!?()\"\u2013\u2014]")
"""Punctuation that ends a clause: "dressed all in black, eyes shining" gives the eyes no colour."""


def tag_colour(tag: str) -> Optional[Tuple[str, FrozenSet[str]]]:
    """`red_eyes` → ("eyes", {red}); `light_blue_hair` → ("hair", {blue}); None for other tags."""
    match = _TAG_COLOUR.match(tag)
    if not match or match.group(1) not in COLOURS:
        return None
    return match.group(2), COLOURS[match.group(1)]


def colour_word(word: str) -> Optional[FrozenSet[str]]:
    """The groups a colour word names, "-ish" forms too (reddish, bluish, purplish)."""
    if word in COLOURS:
        return COLOURS[word]
    if word.endswith("ish"):
        base = word[:-3]
        for candidate in (base, base + "e", base[:-1]):
            if candidate in COLOURS:
                return COLOURS[candidate]
    return None


def compatible(groups: FrozenSet[str], said: FrozenSet[str]) -> bool:
    return any(a == b or frozenset((a, b)) in NEIGHBOURS for a in groups for b in said)


def colour_runs(text: str, part: str) -> List[Tuple[FrozenSet[str], str]]:
    """Each colour the folded caption gives `part` ("long blue hair", "reddish-brown eyes"): the
    groups of its colour words, and the words as written."""
    words = list(_WORD.finditer(text))
    runs = []
    for index, word in enumerate(words):
        if word.group() not in PARTS[part]:
            continue
        following = words[index + 1].group() if index + 1 < len(words) else ""
        if following in _NOT_THE_PART[part] and not re.search(r"[.,;!?]", text[word.end():words[index + 1].start()]):
            continue
        groups: Set[str] = set()
        start = word.start()
        for back in range(index - 1, max(-1, index - 6), -1):
            if _CLAUSE_MARK.search(text[words[back].end():start]):
                break
            name = words[back].group()
            colour = colour_word(name)
            if colour:
                groups |= colour
                start = words[back].start()
            elif not (name in ("and", "or") and groups) and name not in _DESCRIBING:
                break
        if groups and not negated(text, start):
            runs.append((frozenset(groups), text[start:word.end()]))
    return runs


def colour_findings(text: str, tags: Set[str], single: bool) -> List[Finding]:
    """A colour given to the eyes or hair that the one colour tag of a single person rules out."""
    if not single:
        return []
    findings = []
    for part in PARTS:
        colours = [(tag, found[1]) for tag in tags for found in [tag_colour(tag)] if found and found[0] == part]
        if len(colours) != 1 or tags & MIXED[part]:
            continue
        tag, groups = colours[0]
        runs = colour_runs(text, part)
        if runs and not any(compatible(groups, said) for said, _ in runs):
            findings.append(against(display_tag(tag), runs[0][1]))
    return findings


# --- people --------------------------------------------------------------------------------

@dataclass(frozen=True)
class People:
    """What exact count tags say: everyone, and the girls and boys when the tags tell them apart."""
    total: int
    girls: Optional[int]
    boys: Optional[int]
    tags: Tuple[str, ...]
    focus: bool = False
    """`solo_focus`: others are in the picture, partly."""

    @property
    def single(self) -> bool:
        return self.total == 1 and not self.focus


_COUNT_TAG = re.compile(r"^(\d+)(\+?)(girl|boy|other)s?$")
_MULTIPLE = {"multiple_girls", "multiple_boys", "multiple_others"}


def count_people(tags: Set[str]) -> Optional[People]:
    """The people the tags count exactly; None when they do not (`6+girls`, `multiple_boys`,
    `no_humans`, no count tag, or tags that disagree)."""
    counted: Dict[str, int] = {}
    shown = []
    for tag in sorted(tags):
        match = _COUNT_TAG.match(tag)
        if match:
            if match.group(2):
                return None
            counted[match.group(3)] = counted.get(match.group(3), 0) + int(match.group(1))
            shown.append(tag)
    if tags & _MULTIPLE or "no_humans" in tags or not (counted or "solo" in tags):
        return None
    shown += ["solo"] if "solo" in tags else []
    focus = "solo_focus" in tags
    if not counted:
        return People(1, None, None, tuple(shown), focus)
    total = sum(counted.values())
    if "solo" in tags and total != 1:
        return None
    known = not counted.get("other")  # `1other` may look like a girl or a boy
    return People(total, counted.get("girl", 0) if known else None, counted.get("boy", 0) if known else None,
                  tuple(shown), focus)


NUMBERS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
           "pair of": 2, "duo of": 2, "trio of": 3, "group of": 2, **{str(n): n for n in range(2, 11)}}
"""Number words, and the least number each claims (a group of students: at least two). Not
"many", "several", "a few", "multiple" or "a couple of": "one of many students", "a scene many
people would call idyllic" say nothing of who is in the picture."""
FEMALE = {"girls", "women", "ladies", "sisters", "schoolgirls", "females", "maids"}
MALE = {"boys", "men", "guys", "brothers", "schoolboys", "males"}
PERSONS = {"people", "persons", "individuals", "friends", "children", "kids", "students", "humans", "adults",
           "teenagers", "teens", "twins"} | FEMALE | MALE
"""Not "characters" or "figures": three characters written on a note, two small figures of knights."""
_NOT_FILLER = {"and", "or", "with", "of", "in", "on", "at", "to", "from", "by", "while", "holding", "the"}
_CLAIM = re.compile(r"(?<!\w)(" + "|".join(sorted((re.escape(word).replace(r"\ ", r"\s+") for word in NUMBERS),
                                                  key=len, reverse=True))
                    + r")\s+((?:[a-z'-]+\s+){0,2}?)(" + "|".join(sorted(PERSONS)) + r")(?!\w)")
_ALONE = re.compile(r"(?<!\w)(?:(?:a|the)\s+(?:lone|solitary)\s+(?:[a-z-]+\s+)?(?:girl|boy|woman|man|person|figure)"
                    r"|(?:girl|boy|woman|man|person|figure|character)\s+(?:[a-z]+\s+)?alone"
                    r"|(?:all|completely|entirely)\s+alone|by\s+(?:her|him)self|on\s+(?:her|his)\s+own)(?!\w)")
_ELSEWHERE = re.compile(r"(?<!\w)(?:photo|photos|photograph|picture|pictures|poster|posters|painting|paintings|drawing|"
                        r"drawings|portrait|screen|television|tv|monitor|phone|magazine|book|card|cards|reflection|"
                        r"mirror|statues?|figurines?|dolls?|background|distance|crowd|behind|silhouettes?|shadows?|"
                        r"sketch|framed|frame|sign|mural|manga|comic|panel|cover|print|sticker|window)(?!\w)")
"""Words that put people somewhere else than in the scene: a photo of two boys, a crowd behind."""
_DEPICTED = re.compile(r"(?<!\w)(?:printed|prints|logos?|patterns?|patterned|embroidered|drawn|written|pictured|"
                       r"depicted|illustrated|painted)(?!\w)")
"""Words that do so in the claim's own clause: a T-shirt printed with two cartoon girls (but
"two girls sit on a bench, drawn in a soft style" still counts)."""


SENTENCE_REACH = 300
"""Characters looked at on each side of a claim for its sentence: a reply without full stops
costs no more than one with them."""


def _sentence(text: str, start: int, end: int, marks: str = ".!?;") -> str:
    low, high = max(0, start - SENTENCE_REACH), min(len(text), end + SENTENCE_REACH)
    first = max(max(text.rfind(mark, low, start) for mark in marks) + 1, low)
    ends = [found for found in (text.find(mark, end, high) for mark in marks) if found >= 0]
    return text[first:min(ends) if ends else high]


def elsewhere(text: str, start: int, end: int) -> bool:
    """Whether the claim at text[start:end] is about people in a picture, a print or the background."""
    return bool(_ELSEWHERE.search(_sentence(text, start, end))
                or _DEPICTED.search(_sentence(text, start, end, ".!?;:,()\u2013\u2014")))


def people_findings(text: str, people: Optional[People]) -> List[Finding]:
    """More people than the tags count ("two girls" for `1girl, solo`), or one alone among several."""
    if people is None:
        return []
    tagged = ", ".join(people.tags)
    for match in _CLAIM.finditer(text):
        if set(match.group(2).split()) & _NOT_FILLER:
            continue
        noun = match.group(3)
        limit = people.girls if noun in FEMALE else people.boys if noun in MALE else None
        limit = people.total if limit is None else limit
        if NUMBERS[" ".join(match.group(1).split())] > limit and not negated(text, match.start()) \
                and not elsewhere(text, match.start(), match.end()):
            return [against(tagged, match.group())]
    if people.total > 1 and not people.focus:
        for match in _ALONE.finditer(text):
            if not negated(text, match.start()) and not elsewhere(text, match.start(), match.end()):
                return [against(tagged, match.group())]
    return []


# --- the table of opposites ----------------------------------------------------------------

Table = Tuple[Tuple[str, Tuple[str, ...]], ...]


def load_table(path: Path) -> Table:
    """`tag: phrase, phrase` lines; `#` starts a comment. A line that is not one stops the run
    before any request."""
    try:
        text = read_regular(path).decode("utf-8-sig")
    except OSError as exc:
        raise ConfigError(os_error_text(exc, path, "guards.contradictions")
                          + " (guards.contradictions: null for no table of opposites)") from None
    except UnicodeDecodeError:
        raise ConfigError(f"guards.contradictions: {path} is not UTF-8 text") from None
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        tag, _, phrases = line.partition(":")
        listed = tuple(phrase.strip() for phrase in phrases.split(",") if phrase.strip())
        if not _ or not normalize_tag(tag) or not listed:
            raise ConfigError(f"guards.contradictions: {path} line {number} is not `tag: phrase, phrase` "
                              f"(got {line[:60]!r})")
        rows.append((normalize_tag(tag), listed))
    return tuple(rows)


def table_findings(text: str, tags: Set[str], table: Sequence[Tuple[str, Tuple[str, ...]]]) -> List[Finding]:
    """A phrase the table rules out for a tag of the image; a phrase that is itself one of its
    tags is left alone (`short_hair: long hair` on an image tagged both, two people)."""
    findings = []
    for tag, phrases in table:
        if tag not in tags:
            continue
        for phrase in phrases:
            said = None if normalize_tag(phrase) in tags else mentioned(text, phrase)
            if said:
                findings.append(against(display_tag(tag), said))
                break
    return findings
