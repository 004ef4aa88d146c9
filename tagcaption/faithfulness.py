"""The faithfulness check: a caption written from an image's tags keeps what they promise and
does not contradict them.

It is one more guard (`guards.faithfulness`, counted as `guards.faithfulness`), run on the
cleaned reply after the others, and only on a reply to a prompt that carried the image's tags:
a vision model captioning alone is never held to tags it was not given. Each rule applies to
the kinds of tags the prompt carried (`{tags}` carries all; `{character_names}` the characters):

- every character and copyright tag is named: any distinctive word of it, any case ("Miku" for
  `hatsune_miku`, "Kaga" for `kaga_(kantai_collection)`); with no category known for any tag
  (plain tags, no tag source) none can be, and the summary counts the image (`names_unchecked`);
- the name the prompt asked for (`style.name` through `{name}` or the `name` extra option) is
  used; a `postprocess.prefix` that holds it keeps the promise by construction;
- no trait of `style.omit_traits_of` is mentioned;
- nothing contradicts the tags: eye and hair colour, the number of people, the table of
  opposites (contradictions.py).

The check sees the caption as it would be written (tags of a `tags_then_caption` style and the
prefix added) for names, and the model's own text for everything else. With `retry` a reply
that fails is asked again, told exactly what to fix; with `warn` the caption is kept and what
was found goes into its record (`flags`) and onto the review page.
"""
from __future__ import annotations

import logging
import re
from typing import Callable, Dict, List, Optional, Set, Tuple

from tagcaption.config import Config
from tagcaption.contradictions import (Finding, Table, adorning, colour_findings, colour_runs, compatible,
                                       count_people, fold, load_table, people_findings, phrase_pattern,
                                       table_findings, tag_colour)
from tagcaption.guards import Trip
from tagcaption.postprocess import add_affixes
from tagcaption.tag_names import display_name, split_qualifier
from tagcaption.tagfiles import display_tag, normalize_tag
from tagcaption.tally import Tally
from tagcaption.vocabulary import CATEGORIES, FAITHFULNESS, GENERAL

log = logging.getLogger("caption")

Check = Callable[[str], Optional[Trip]]
"""A reply's cleaned text → what is wrong with it, if anything."""

NAMED = ("character", "copyright")
"""The categories whose every tag a caption must name."""
NOT_A_NAME = {"original"}
"""Danbooru's copyright tag for original works: nothing to name."""
GENERIC_WORDS = frozenset("""the and with from for her his girl girls boy boys man men woman women lady kid child
    san chan kun sama version ver form mode style costume outfit alter alternate cosplay young old little big small
    mini chibi new first second third type series mr. mrs. ms. dr. miss mister""".split())
"""Words of a name that would not show the caption names it ("girl" of `cat_girl_(xyz)`)."""
FIX = "to keep such captions and flag them for review instead, set guards.faithfulness: warn"
AGAIN = " Write the caption again with this fixed, and answer with the caption only."


def carried(names: Set[str]) -> Set[str]:
    """The tag categories a prompt built from these placeholders gives the model."""
    if names & {"tags", "booru_tags"}:
        return set(CATEGORIES)
    return {category for category in CATEGORIES if {f"{category}_tags", f"{category}_names"} & names}


def name_words(tag: str) -> List[str]:
    """The words of a name that show a caption names it: those of 3 letters or more that are not
    generic, without the qualifier; the whole name when none is left (`2b`)."""
    base, _ = split_qualifier(tag)
    words = [word for word in re.split(r"[\s/:]+", fold(base)) if word]
    distinctive = [word for word in words if len(word) >= 3 and word not in GENERIC_WORDS]
    return distinctive or ([" ".join(words)] if words else [])


def names_it(caption: str, tag: str) -> bool:
    """Whether the folded caption names the tag's character or series."""
    words = name_words(tag)
    return not words or any(phrase_pattern(word).search(caption) for word in words)


def _listed(text: str) -> List[str]:
    return [part.strip() for part in (text or "").split(", ") if part.strip()]


class Faithfulness:
    """The run's side of the check: its mode, how a failing reply is asked again, the table of
    opposites (read once, before any request), the omitted traits and the affixes."""

    def __init__(self, config: Config):
        guards = config.guards
        self.mode = guards.faithfulness
        self.retry = "corrective" if guards.retry_mode == "corrective" else "remind"
        self.table: Table = load_table(config.resource(guards.contradictions)) \
            if guards.contradictions and self.mode != "off" else ()
        self.omit = tuple(normalize_tag(tag) for tag in config.style.omit_traits_of)
        self.affixes = (config.postprocess.prefix, config.postprocess.suffix)

    def for_image(self, values: Dict[str, str]) -> Optional["ImageCheck"]:
        """The check of one image, from its prompt values (the tags its prompts were given)."""
        return None if self.mode == "off" else ImageCheck(self, values)


class ImageCheck:
    """One image's check. The stage that writes the caption asks it for the check of the prompt
    it sends (`for_prompt`); it keeps what it found: `corrected`, in replies that were asked
    again, and `flags`, on the captions kept (warn): those of every variant, each once."""

    def __init__(self, run: Faithfulness, values: Dict[str, str]):
        self.run = run
        self.tags = {normalize_tag(tag) for key in ("tags", "booru_tags") for tag in _listed(values.get(key, ""))}
        self.required: Dict[str, List[Tuple[str, str]]] = {}
        for category in NAMED:
            tags = [normalize_tag(tag) for tag in _listed(values.get(f"{category}_tags", ""))]
            shown = _listed(values.get(f"{category}_names", ""))
            shown = shown if len(shown) == len(tags) else [display_name(tag) for tag in tags]
            self.required[category] = [(tag, name) for tag, name in zip(tags, shown) if tag not in NOT_A_NAME]
        self.people = count_people(self.tags)
        self.name = values.get("name", "")
        carried = {normalize_tag(trait) for trait in _listed(values.get("omit", ""))}
        self.omit = [tag for tag in run.omit if tag in carried]
        """The omitted traits this image carries (placeholders.carried_traits)."""
        self.uncategorised = bool(self.tags) and not any(values.get(f"{category}_tags") for category in CATEGORIES
                                                         if category != GENERAL)
        """Every tag of the image came out general: its categories are unknown (plain tags, no
        sidecar, no tag source), so no name can be required."""
        self.names_unchecked = False
        """A prompt carried the names' kinds of tags, but no tag was known to be a name."""
        self.corrected: List[str] = []
        self.flags: List[str] = []

    def for_prompt(self, names: Set[str], instruction: str = "",
                   finish: Callable[[str], str] = lambda text: text) -> Optional[Check]:
        """The check for a reply to a prompt built from the placeholders `names` (and a style's
        `instruction`); `finish` makes the caption of the reply as the stage returns it. None
        when the prompt carried no tags."""
        kinds = carried(names)
        if not kinds:
            return None
        self.names_unchecked = self.names_unchecked or bool(kinds & set(NAMED)) and self.uncategorised
        promised = bool(self.name) and ("name" in names or self.name in instruction)

        def check(text: str) -> Optional[Trip]:
            caption = add_affixes(finish(text), *self.run.affixes)
            return self._judge(self.findings(fold(text), fold(caption), kinds, promised))
        return check

    def findings(self, said: str, caption: str, kinds: Set[str], promised: bool) -> List[Finding]:
        """What is wrong with a folded reply (`said`) and the folded caption made of it."""
        found = [Finding(f"does not name {name}", f"The caption must name {name}.", f"The caption must name {name}.")
                 for category in NAMED if category in kinds for tag, name in self.required[category]
                 if not names_it(caption, tag)]
        if promised and not phrase_pattern(self.name).search(caption):
            found.append(Finding(f"does not use the name {self.name} (style.name)",
                                 f"The caption must name {self.name}.", f"The caption must name {self.name}."))
        found += self._omitted(said)
        if "general" in kinds:
            found += colour_findings(said, self.tags, self.people is not None and self.people.single)
            found += people_findings(said, self.people)
            found += table_findings(said, self.tags, self.run.table)
        return found

    def _omitted(self, said: str) -> List[Finding]:
        """Each trait of `style.omit_traits_of` the reply mentions (not as a print or an accessory:
        "a blue hair ribbon"); for an eye or hair colour, a colour close to it counts too (teal
        eyes for `aqua_eyes`)."""
        exact = {tag: display_tag(tag) for tag in self.omit
                 if any(not adorning(said, match.start(), match.end())
                        for match in phrase_pattern(display_tag(tag), plural=True).finditer(said))}
        mentions = dict(exact)
        for tag in self.omit:
            colour = tag_colour(tag)
            if tag not in mentions and colour is not None:
                close = next((phrase for groups, phrase in colour_runs(said, colour[0])
                              if compatible(colour[1], groups)), None)
                if close and close not in exact.values():  # "blue hair" is blue_hair's, not aqua_hair's
                    mentions[tag] = close
        return [Finding(f"mentions {mention} (style.omit_traits_of: {tag})", f"Do not mention {mention}.",
                        f"Do not mention {mention}.") for tag, mention in mentions.items()]

    def _judge(self, findings: List[Finding]) -> Optional[Trip]:
        says = [finding.says for finding in findings]
        if not findings or self.run.mode == "warn":
            self.flags += [said for said in says if said not in self.flags]  # every variant's, none erased
            return None
        self.corrected += says
        if self.run.retry == "corrective":
            text = " ".join(finding.correction for finding in findings) + AGAIN
        else:
            text = " ".join(finding.requirement for finding in findings)
        return Trip(FAITHFULNESS, "caption not faithful to the tags: " + "; ".join(says), self.run.retry, text, fix=FIX)


def faithfulness_record(check: ImageCheck, image: str, tally: Tally) -> Dict[str, List[str]]:
    """The record's `corrected` (what replies asked again were found to do) and `flags` (what the
    caption kept was found to do, with `warn`); a flagged caption is counted and said, and so is
    an image whose names could not be checked (`images.names_unchecked`, for the summary)."""
    record: Dict[str, List[str]] = {}
    if check.names_unchecked:
        tally.update("images.names_unchecked")
    if check.corrected:
        record["corrected"] = list(dict.fromkeys(check.corrected))
    if check.flags:
        record["flags"] = list(check.flags)
        tally.update("images.flagged")
        log.warning("warning: %s: caption kept with faithfulness findings: %s", image, "; ".join(check.flags),
                    extra={"group": "flagged", "item": image, "summary": "warning: {count} captions were kept with "
                           "faithfulness findings (guards.faithfulness: warn): their records' flags and the review "
                           "page list them"})
    return record
