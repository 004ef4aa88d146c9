"""The template-variable contract: which prompt may name which value, and what an image's values are."""
import pytest

from tagcaption.config import TagsConfig
from tagcaption.errors import ConfigError
from tagcaption.placeholders import (INTERPRETER_PLACEHOLDERS, INTERROGATOR_PLACEHOLDERS, PLACEHOLDERS,
                                     STYLE_WRAPPER_PLACEHOLDERS, SUMMARY_PLACEHOLDERS, TAG_VARIABLES,
                                     image_values, used_by)
from tagcaption.tag_provider import TagFilter, TagKnowledge
from tagcaption.templates import Template


def test_each_prompt_gets_the_values_of_the_one_before_it_and_its_own():
    assert set(SUMMARY_PLACEHOLDERS) == {"tag", "wiki"}
    assert set(INTERROGATOR_PLACEHOLDERS) == set(TAG_VARIABLES) | {"filename", "folder", "hints", "name", "omit"}
    assert set(INTERPRETER_PLACEHOLDERS) == set(INTERROGATOR_PLACEHOLDERS) | {"description"}
    assert set(STYLE_WRAPPER_PLACEHOLDERS) == set(INTERPRETER_PLACEHOLDERS) | {"instruction"}
    assert all(entry.filled_with for entry in PLACEHOLDERS.values())


def test_image_values_fill_exactly_what_the_interpreter_may_name():
    knowledge = {"long_hair": TagKnowledge("Hair below the shoulders.", "general", 900, True),
                 "hatsune_miku": TagKnowledge(None, "character", 50, True),
                 "highres": TagKnowledge(None, "meta", 900, True)}
    values = image_values(["long_hair", "hatsune_miku", "highres", "lora_word"], knowledge,
                          {"lora_word": "artist"}, "q", TagFilter(TagsConfig()),
                          filename="a.png", folder="sub", name="Miku", hints="From: sub/a.png")
    assert set(values) == set(INTERPRETER_PLACEHOLDERS)
    assert values["tags"] == "long hair, hatsune miku, lora word"
    assert values["booru_tags"] == "long_hair, hatsune_miku, lora_word"
    assert values["tag_descriptions"] == "long hair: Hair below the shoulders."
    assert values["character_tags"] == "hatsune miku" and values["artist_tags"] == "lora word"
    assert values["meta_tags"] == "" and values["rating"] == "questionable"
    assert (values["filename"], values["folder"], values["name"], values["hints"], values["description"]) == \
        ("a.png", "sub", "Miku", "From: sub/a.png", "")


def test_used_by_names_the_values_a_prompt_consumes():
    system = Template("You see {filename}.", INTERROGATOR_PLACEHOLDERS, "system")
    prompt = Template("Tags: {tags}. {{literal}}", INTERROGATOR_PLACEHOLDERS, "prompt")
    assert used_by(system, prompt) == {"filename", "tags"}
    assert used_by() == set()


def test_a_prompt_naming_a_value_of_a_later_stage_is_refused():
    with pytest.raises(ConfigError, match=r"unknown placeholder \{description\}"):
        Template("{description}", INTERROGATOR_PLACEHOLDERS, "interrogator prompt 1")


def test_tag_descriptions_keep_the_rarest_tags_up_to_the_cap():
    from tagcaption.config import InterpreterConfig
    from tagcaption.placeholders import MAX_TAG_DESCRIPTIONS, tag_variables

    assert InterpreterConfig().max_tag_descriptions == MAX_TAG_DESCRIPTIONS == 30
    tags = [f"tag_{n:02}" for n in range(60)]
    knowledge = {tag: TagKnowledge(f"Meaning {n}.", "general", 1000 * (60 - n) if n % 10 else None, True)
                 for n, tag in enumerate(tags)}
    knowledge["tag_05"] = TagKnowledge(None, "general", 1, True)  # no summary: never a line, whatever its count
    lines = tag_variables(tags, knowledge, {}, None, TagFilter(TagsConfig()))["tag_descriptions"].splitlines()
    assert len(lines) == 30
    # Fewest posts first (tag_59 has 1,000), in the image's own order; tags without a count come last.
    shown = [int(line.split(":")[0][4:]) for line in lines]
    assert shown == sorted(shown) and shown[0] == 27 and shown[-1] == 59 and 5 not in shown
    assert not {0, 10, 20, 30, 40, 50} & set(shown)
    few = tag_variables(tags, knowledge, {}, None, TagFilter(TagsConfig()), max_descriptions=3)["tag_descriptions"]
    assert few.splitlines() == ["tag 57: Meaning 57.", "tag 58: Meaning 58.", "tag 59: Meaning 59."]
    everything = tag_variables(tags, knowledge, {}, None, TagFilter(TagsConfig()), max_descriptions=None)
    assert len(everything["tag_descriptions"].splitlines()) == 59
    none = tag_variables(tags, knowledge, {}, None, TagFilter(TagsConfig()), max_descriptions=0)
    assert none["tag_descriptions"] == "" and none["tags"].count(",") == 59
    counts_unknown = {tag: TagKnowledge(f"Meaning {n}.", "general", None, True) for n, tag in enumerate(tags)}
    first = tag_variables(tags, counts_unknown, {}, None, TagFilter(TagsConfig()))["tag_descriptions"]
    assert first.splitlines()[-1] == "tag 29: Meaning 29."  # no counts at all: the first 30, in order


def test_tag_descriptions_stay_within_their_token_budget_rarest_first():
    from tagcaption.config import InterpreterConfig
    from tagcaption.placeholders import TAG_DESCRIPTIONS_TOKENS, tag_variables

    assert InterpreterConfig().tag_descriptions_tokens == TAG_DESCRIPTIONS_TOKENS == 800
    tags = [f"tag_{n:02}" for n in range(40)]
    long_summary = "A long summary of thirty words " + "that goes on and on " * 5 + "until its end."
    knowledge = {tag: TagKnowledge(long_summary, "general", 100 + n, True) for n, tag in enumerate(tags)}
    knowledge["tag_39"] = TagKnowledge("Short.", "general", 10_000, True)  # the most common, but short
    text = tag_variables(tags, knowledge, {}, None, TagFilter(TagsConfig()))["tag_descriptions"]
    assert len(text) <= TAG_DESCRIPTIONS_TOKENS * 4
    lines = text.splitlines()
    assert lines[0].startswith("tag 00:") and 20 < len(lines) < 30
    assert lines[-1] == "tag 39: Short."  # a line that fits after the long ones stopped fitting is kept
    tight = tag_variables(tags, knowledge, {}, None, TagFilter(TagsConfig()), max_tokens=5)["tag_descriptions"]
    assert tight == "tag 39: Short."
    unbounded = tag_variables(tags, knowledge, {}, None, TagFilter(TagsConfig()), max_descriptions=None,
                              max_tokens=None)["tag_descriptions"]
    assert len(unbounded.splitlines()) == 40
