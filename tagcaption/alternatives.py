"""Several captions per image (`output.variants: N`), one a line of the caption file.

Trainers that read a caption file line by line pick one line per step (docs/training.md),
so every line must be a whole caption: the N captions of an image are asked one after the
other, each through the stage's own `LLM.complete` (every guard applies), each made one
line, and each compared with the ones before it. A repeat (the same words, or word sets
that overlap by JACCARD or more) trips the `duplicate_variant` guard and is asked again
with a corrective turn naming the caption it repeats: a fresh attempt with the same seed
would only repeat itself.

The prompt of caption i is the image's `prompt_variants` pick for i = 0 (so N = 1 asks as
before) and the next ones in the list after it, round and round; with N > 1 each request
carries `seed` = the stage's seed (or 0) + i, so one prompt still gives N samples.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Dict, List, Sequence

from tagcaption.config import StageConfig
from tagcaption.guards import ReplyRejected, Trip
from tagcaption.sinks import shorten
from tagcaption.variants import Variant, pick
from tagcaption.vocabulary import INTERPRETER

JACCARD = 0.9
"""Word-set overlap (shared words / all words) from which two captions are one caption."""
WORD = re.compile(r"[^\W_]+")
SHOWN = 160
"""Characters of the earlier caption quoted in the corrective turn."""


@dataclass
class Caption:
    text: str
    data: Any = None
    """The structured caption's object, when the caption was asked as JSON (structured.py)."""


def ordered(variants: Sequence[Variant], key: str, count: int) -> List[Variant]:
    """The prompt variant of each of the image's `count` captions."""
    first = list(variants).index(pick(variants, key))
    return [variants[(first + index) % len(variants)] for index in range(count)]


def sampling(settings: StageConfig, index: int, count: int) -> Dict[str, Any]:
    """The request fields of caption `index` of `count`: none for one caption (as before)."""
    return {} if count == 1 else {"seed": (settings.seed or 0) + index}


def single_line(text: str) -> str:
    """A caption a trainer reads as one line: line breaks inside it become spaces."""
    return re.sub(r"[ \t]*\n\s*", " ", text).strip()


def words(text: str) -> List[str]:
    return WORD.findall(text.lower())


def similar(first: str, second: str) -> bool:
    """The same caption in all but punctuation, case or a word or two."""
    one, two = words(first), words(second)
    if one == two:
        return True
    left, right = set(one), set(two)
    if not left or not right:
        return False
    return len(left & right) / len(left | right) >= JACCARD


class Distinct:
    """The captions an image has so far; `check` rejects a new one that repeats any of them."""

    def __init__(self, answer_with: str = "the caption only", stage: str = INTERPRETER):
        self.earlier: List[str] = []
        self.answer_with = answer_with
        self.fix = f"raise {stage}.temperature (to 0.8 or more), add {stage}.prompt_variants, or lower output.variants"
        """For the failure line: a server whose answers do not vary repeats caption 1 however often it is asked."""

    def check(self, text: str) -> None:
        for number, earlier in enumerate(self.earlier, 1):
            if similar(text, earlier):
                quoted = shorten(earlier, SHOWN)
                raise ReplyRejected(Trip(
                    "duplicate_variant", f"a caption that repeats caption {number} of this image", "corrective",
                    f"That caption repeats one already written for this image (\"{quoted}\"). Write a different "
                    f"caption of the same image, true to the same facts, in other words and another order. "
                    f"Answer with {self.answer_with}.", self.fix))

    def add(self, text: str) -> None:
        self.earlier.append(text)
