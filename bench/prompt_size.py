"""How big the caption prompt is, and how much of it the tag summaries take (not a test).

Renders the shipped config's Interpreter template, as a run fills it, for one image with
`--tags` tags, every one of them with a summary of `--words` words (the summary template
asks for at most 30), with `interpreter.max_tag_descriptions` and
`interpreter.tag_descriptions_tokens` at their defaults, with the count cap alone, and with no
cap, and prints characters and tokens estimated at 4 characters a token.

    python bench/prompt_size.py --tags 40 --words 30 18
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

from tagcaption.config import TagsConfig, load_config  # noqa: E402
from tagcaption.placeholders import MAX_TAG_DESCRIPTIONS, TAG_DESCRIPTIONS_TOKENS, image_values  # noqa: E402
from tagcaption.tag_provider import TagFilter, TagKnowledge  # noqa: E402
from tagcaption.templates import Template  # noqa: E402
from tagcaption.placeholders import INTERPRETER_PLACEHOLDERS  # noqa: E402
from tagcaption.variants import build_variants, caption_template  # noqa: E402
from tagcaption.vocabulary import INTERPRETER  # noqa: E402

TAGS = ("1girl solo long_hair looking_at_viewer smile blush open_mouth blue_eyes brown_hair shirt skirt "
        "long_sleeves hair_ornament holding jewelry white_shirt closed_mouth standing school_uniform outdoors "
        "day sky cloud tree bow ribbon jacket pleated_skirt thighhighs sitting black_hair flower red_eyes "
        "earrings collarbone bangs upper_body hat dress sunlight").split()
WORDS = ("a character whose hair falls well past the shoulders often reaching the middle of the back worn loose "
         "or tied with ribbons shown from the front in soft light with a calm expression and visible details").split()


def summary(words: int, seed: int) -> str:
    chosen = [WORDS[(seed * 7 + n * 3) % len(WORDS)] for n in range(words)]
    return " ".join(chosen).capitalize() + "."


def render(template: Template, tags, words: int, cap, budget=None) -> str:
    knowledge = {tag: TagKnowledge(summary(words, n), "general", 1000 + n, True) for n, tag in enumerate(tags)}
    values = image_values(tags, knowledge, {}, None, TagFilter(TagsConfig(exclude_categories=[])),
                          filename="a.png", folder=".", name="", hints="", max_descriptions=cap,
                          max_tokens=budget)
    return template.render(**values, instruction="")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tags", type=int, default=40)
    parser.add_argument("--words", type=int, nargs="*", default=[30, 18], help="words per tag summary")
    args = parser.parse_args()
    config = load_config()
    variant = build_variants(config, INTERPRETER)[0]
    template = Template.load(config.resource(caption_template(config, variant)), INTERPRETER_PLACEHOLDERS)
    tags = (TAGS * (args.tags // len(TAGS) + 1))[: args.tags]
    tags = [tag if tags.index(tag) == n else f"{tag}_{n}" for n, tag in enumerate(tags)]
    bare = render(template, tags, 0, 0)
    print(f"template {template.origin}, {args.tags} tags: without summaries {len(bare):,} "
          f"characters, about {len(bare) // 4} tokens")
    for words in args.words:
        for cap, budget, name in (
                (MAX_TAG_DESCRIPTIONS, TAG_DESCRIPTIONS_TOKENS,
                 f"defaults (max_tag_descriptions {MAX_TAG_DESCRIPTIONS}, tag_descriptions_tokens "
                 f"{TAG_DESCRIPTIONS_TOKENS})"),
                (MAX_TAG_DESCRIPTIONS, None, f"max_tag_descriptions {MAX_TAG_DESCRIPTIONS} alone"),
                (None, None, "no cap")):
            prompt = render(template, tags, words, cap, budget)
            share = (len(prompt) - len(bare)) / len(prompt)
            print(f"  summaries of {words} words, {name}: {len(prompt):,} characters, about {len(prompt) // 4} "
                  f"tokens, {share:.0%} of them summaries")


if __name__ == "__main__":
    main()
