"""The template-variable contract: every `{placeholder}` a prompt may hold, what fills it,
and which prompts may use it.

Four kinds of prompt are filled:

- the tag summary template (`tag_provider.prompt_template`): one tag and its wiki page;
- the Interrogator's system prompt and prompts: the image's tag values and its place;
- the Interpreter's template: those, and the Interrogator's description;
- the style wrapper (`templates/styles/_interpreter.txt`): those, and the style's instruction.

A template naming anything else is refused when it is loaded (see templates.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Sequence, Set, Tuple

from tagcaption.tag_names import NAMED_CATEGORIES, display_name
from tagcaption.tagfiles import display_tag, normalize_tag
from tagcaption.vocabulary import CATEGORIES, GENERAL, RATINGS

if TYPE_CHECKING:
    from tagcaption.tag_provider import TagFilter, TagKnowledge
    from tagcaption.templates import Template

TAG_SUMMARY = "tag summary template"
INTERROGATOR_PROMPTS = "interrogator prompts"
INTERPRETER_TEMPLATE = "interpreter template"
STYLE_WRAPPER = "style wrapper"
PROMPTS = (TAG_SUMMARY, INTERROGATOR_PROMPTS, INTERPRETER_TEMPLATE, STYLE_WRAPPER)

_IMAGE_PROMPTS = (INTERROGATOR_PROMPTS, INTERPRETER_TEMPLATE, STYLE_WRAPPER)
_AFTER_DESCRIPTION = (INTERPRETER_TEMPLATE, STYLE_WRAPPER)


@dataclass(frozen=True)
class Placeholder:
    name: str
    filled_with: str
    prompts: Tuple[str, ...]


PLACEHOLDERS: Dict[str, Placeholder] = {entry.name: entry for entry in [
    Placeholder("tag", "the tag being summarised, with spaces for underscores", (TAG_SUMMARY,)),
    Placeholder("wiki", "the tag's wiki page as plain text, without link lists and see-also sections",
                (TAG_SUMMARY,)),
    Placeholder("tags", "the image's tags after exclusions, with spaces for underscores, aliases as their "
                "target (`tags.resolve_aliases`) and without tags a more specific one implies "
                "(`tags.prune_implied`)", _IMAGE_PROMPTS),
    Placeholder("booru_tags", "the image's own tags after exclusions, as written on Danbooru (`long_hair`)",
                _IMAGE_PROMPTS),
    Placeholder("tag_descriptions", "one `tag: summary` line per kept tag that has a summary, at most "
                "`interpreter.max_tag_descriptions` lines in `interpreter.tag_descriptions_tokens` tokens "
                "(the rarest tags kept)", _IMAGE_PROMPTS),
    Placeholder("rating", "the image's rating as a word (general, sensitive, questionable, explicit)",
                _IMAGE_PROMPTS),
    *(Placeholder(f"{category}_tags", f"the kept tags of the {category} category", _IMAGE_PROMPTS)
      for category in CATEGORIES),
    *(Placeholder(f"{category}_names", f"the kept {category} tags as names (`Hatsune Miku`, "
                  "`Kaga (Kantai Collection)`), spelled as their wiki page writes them where it does", _IMAGE_PROMPTS)
      for category in NAMED_CATEGORIES),
    Placeholder("filename", "the image's file name", _IMAGE_PROMPTS),
    Placeholder("folder", "the image's folder inside the images folder (`.` at its top)", _IMAGE_PROMPTS),
    Placeholder("hints", "the blocks of the `interrogator.hint_sources`, one per source (also added after the "
                "first vision prompt when that prompt does not name it)", _IMAGE_PROMPTS),
    Placeholder("name", "`style.name`: the name a caption may use", _IMAGE_PROMPTS),
    Placeholder("omit", "the traits of `style.omit_traits_of` the image's tags carry, with spaces for underscores "
                "(`blue hair, twintails`): the trigger word stands for them, so a caption must not mention them "
                "(they are left out of the tag values)", _IMAGE_PROMPTS),
    Placeholder("description", "the Interrogator's description (empty when it is off)", _AFTER_DESCRIPTION),
    Placeholder("instruction", "the style preset's instruction, `{name}` filled", (STYLE_WRAPPER,)),
]}


def allowed(prompt: str) -> Tuple[str, ...]:
    """The placeholders a prompt of that kind may hold."""
    return tuple(name for name, entry in PLACEHOLDERS.items() if prompt in entry.prompts)


MAX_TAG_DESCRIPTIONS = 30
"""`interpreter.max_tag_descriptions`'s default: summaries in `{tag_descriptions}` at most."""
TAG_DESCRIPTIONS_TOKENS = 800
"""`interpreter.tag_descriptions_tokens`'s default: the tokens `{tag_descriptions}` may take,
estimated at 4 characters a token, so that the default caption prompt for 40 tags stays under
1,200 tokens however long the summaries are (bench/prompt_size.py)."""
CHARACTERS_PER_TOKEN = 4

TAG_VARIABLES = ("tags", "booru_tags", "tag_descriptions", "rating") + tuple(f"{name}_tags" for name in CATEGORIES) \
    + tuple(f"{name}_names" for name in NAMED_CATEGORIES)
"""The values made from an image's tags (`tag_variables`)."""
SUMMARY_PLACEHOLDERS = allowed(TAG_SUMMARY)
INTERROGATOR_PLACEHOLDERS = allowed(INTERROGATOR_PROMPTS)
INTERPRETER_PLACEHOLDERS = allowed(INTERPRETER_TEMPLATE)
STYLE_WRAPPER_PLACEHOLDERS = allowed(STYLE_WRAPPER)


def used_by(*templates: "Template") -> Set[str]:
    """The placeholders the templates consume: the values a prompt built from them depends on."""
    return set().union(*(template.names for template in templates))


def rating_word(rating: Optional[str]) -> str:
    """`q` or `questionable` → `questionable`; a rating Danbooru does not have stays as given."""
    return RATINGS.get(rating.lower()[:1], rating) if rating else ""


def tag_variables(tags: List[str], knowledge: Mapping[str, "TagKnowledge"], categories: Mapping[str, str],
                  rating: Optional[str], tag_filter: "TagFilter",
                  max_descriptions: Optional[int] = MAX_TAG_DESCRIPTIONS,
                  max_tokens: Optional[int] = TAG_DESCRIPTIONS_TOKENS) -> Dict[str, str]:
    """The template variables made from an image's tags, after exclusions.

    `categories` are those the image's sidecar gives (they win over the source's). An alias
    resolved by the tag provider appears as its target, once; `{booru_tags}` keeps the image's
    own tags, as its tags file has them; `max_descriptions` and `max_tokens` cap
    `{tag_descriptions}` (see `described`)."""
    own: List[str] = []
    kept: Dict[str, Tuple[str, Optional["TagKnowledge"]]] = {}
    for tag in tags:
        info = knowledge.get(tag)
        name = info.alias_of if info is not None and info.alias_of else tag
        category = categories.get(tag) or (info.category if info else None) or GENERAL
        if tag_filter.excluded(tag, category, info) or (name != tag and tag_filter.excluded_by_name(name)):
            continue
        own.append(tag)
        kept.setdefault(name, (category, info))
    if tag_filter.prune_implied:
        kept = _without_implied(kept)
    lines = {name: f"{display_tag(name)}: {info.summary}" for name, (_, info) in kept.items() if info and info.summary}
    shown = described(lines, knowledge, max_descriptions, max_tokens)
    values = {
        "tags": ", ".join(display_tag(name) for name in kept),
        "booru_tags": ", ".join(own),
        "tag_descriptions": "\n".join(line for name, line in lines.items() if name in shown),
        "rating": rating_word(rating),
    }
    for category in CATEGORIES:
        values[f"{category}_tags"] = ", ".join(display_tag(name) for name, (kind, _) in kept.items() if kind == category)
    for category in NAMED_CATEGORIES:
        values[f"{category}_names"] = ", ".join(display_name(name, info.spelling if info else None)
                                                for name, (kind, info) in kept.items() if kind == category)
    return values


def _without_implied(kept: Dict[str, tuple]) -> Dict[str, tuple]:
    """Leave out each tag that another kept tag of the same category implies (`long_hair` beside
    `very_long_hair`); a series implied by a character stays, as the name a caption should say."""
    implied = {parent for name, (category, info) in kept.items() if info is not None
               for parent in info.implies or () if parent != name and parent in kept and kept[parent][0] == category}
    return {name: value for name, value in kept.items() if name not in implied}


def described(lines: Mapping[str, str], knowledge: Mapping[str, "TagKnowledge"], limit: Optional[int],
              max_tokens: Optional[int] = None) -> Set[str]:
    """Which tags get their summary line (`lines`, by tag) in `{tag_descriptions}`: the rarest
    first — fewest posts, by the count the tag source gave; tags without one last, in the
    image's order — at most `limit` lines (None: all) within `max_tokens` (None: no budget; a
    line that no longer fits is left out, a shorter one after it may still fit). A common tag
    (`1girl`, `solo`) tells the model least, and 60 summaries would cost about 3,000 prompt tokens."""
    tags = list(lines)
    if (limit is None or len(tags) <= limit) and max_tokens is None:
        return set(tags)

    def rarity(position: int) -> tuple:
        info = knowledge.get(tags[position])
        count = info.post_count if info is not None else None
        return (count is None, count or 0, position)
    budget = max_tokens * CHARACTERS_PER_TOKEN if max_tokens is not None else None
    shown: Set[str] = set()
    for position in sorted(range(len(tags)), key=rarity):
        if limit is not None and len(shown) >= limit:
            break
        cost = len(lines[tags[position]]) + 1
        if budget is not None:
            if cost > budget:
                continue
            budget -= cost
        shown.add(tags[position])
    return shown


def carried_traits(tags: Sequence[str], omit: Sequence[str]) -> List[str]:
    """The traits of `style.omit_traits_of` this image's tags carry: the trigger word stands for
    them on the images that have them; another character's blue hair is still said."""
    own = {normalize_tag(tag) for tag in tags}
    return [trait for trait in (normalize_tag(tag) for tag in omit) if trait in own]


def image_values(tags: List[str], knowledge: Mapping[str, "TagKnowledge"], categories: Mapping[str, str],
                 rating: Optional[str], tag_filter: "TagFilter", *, filename: str, folder: str, name: str,
                 hints: str, max_descriptions: Optional[int] = MAX_TAG_DESCRIPTIONS,
                 max_tokens: Optional[int] = TAG_DESCRIPTIONS_TOKENS, omit: Sequence[str] = ()) -> Dict[str, str]:
    """Every value an image's prompts may use, `description` empty until the Interrogator gives it."""
    return {"filename": filename, "folder": folder, "name": name,
            "omit": ", ".join(display_tag(tag) for tag in carried_traits(tags, omit)),
            **tag_variables(tags, knowledge, categories, rating, tag_filter, max_descriptions, max_tokens),
            "hints": hints, "description": ""}
