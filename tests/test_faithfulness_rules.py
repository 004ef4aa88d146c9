"""The faithfulness check's matching rules, case by case (issue 19): what trips, and the near
misses that must not (a false alarm costs a good caption; a miss only a check)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import pytest

from tagcaption.config import Config
from tagcaption.contradictions import colour_runs, count_people, fold, load_table
from tagcaption.errors import ConfigError
from tagcaption.faithfulness import Faithfulness, name_words
from tagcaption.placeholders import INTERPRETER_PLACEHOLDERS, image_values
from tagcaption.tag_provider import TagFilter
from tagcaption.templates import Template

TEMPLATES = sorted((Path(__file__).parent.parent / "templates").glob("interpreter_prompt_template*.txt"))

CHARACTER = {"hatsune_miku": "character", "kaga_(kantai_collection)": "character", "c.c.": "character",
             "vocaloid": "copyright", "pokemon": "copyright", "original": "copyright"}


def judge(tags: str, caption: str, *, placeholders: Sequence[str] = ("tags",), omit: Sequence[str] = (),
          name: str = "", instruction: str = "", prefix: str = "", mode: str = "retry",
          exclude: Sequence[str] = (), categories: Optional[Dict[str, str]] = None):
    """The trip (or None) for `caption` as the reply to a prompt of `placeholders` about an image
    with `tags` (comma-separated; the categories of CHARACTER unless `categories`)."""
    config = Config()
    config.style.omit_traits_of, config.guards.faithfulness = list(omit), mode
    config.tags.exclude, config.postprocess.prefix = list(exclude), prefix
    values = image_values([tag.strip() for tag in tags.split(",") if tag.strip()], {},
                          CHARACTER if categories is None else categories, None,
                          TagFilter(config.tags, 0, omit), filename="a.png", folder=".", name=name, hints="",
                          omit=omit)
    check = Faithfulness(config).for_image(values)
    guard = check.for_prompt(set(placeholders), instruction) if check else None
    return (guard(caption) if guard else None), check


NAMES = [
    ("hatsune_miku, 1girl", "Miku sings on a stage.", None),
    ("hatsune_miku, 1girl", "HATSUNE sings.", None),
    ("hatsune_miku, 1girl", "A girl sings on a stage.", "does not name Hatsune Miku"),
    ("hatsune_miku, 1girl", "A girl named Mikuru sings.", "does not name Hatsune Miku"),
    ("kaga_(kantai_collection)", "Kaga draws her bow.", None),
    ("kaga_(kantai_collection)", "An archer from Kantai Collection.", "does not name Kaga (Kantai Collection)"),
    ("c.c.", "C.C. eats pizza.", None),
    ("pokemon", "A Pokémon trainer.", None),
    ("original", "A girl in a field.", None),
    ("vocaloid, hatsune_miku", "Hatsune Miku dances.", "does not name Vocaloid"),
    ("hatsune_miku_(append)", "Miku in her append outfit.", None),
]


@pytest.mark.parametrize("tags, caption, expected", NAMES)
def test_every_character_and_series_is_named_by_a_distinctive_word(tags, caption, expected):
    categories = dict(CHARACTER, **{"hatsune_miku_(append)": "character"})
    trip, _ = judge(tags, caption, categories=categories)
    assert (trip.reason if trip else None) == (expected and f"caption not faithful to the tags: {expected}")


def test_names_are_required_only_when_known_kept_and_given_to_the_prompt():
    assert judge("hatsune_miku", "A girl.", categories={})[0] is None  # no category known: a general tag
    assert judge("hatsune_miku", "A girl.", exclude=["hatsune_*"])[0] is None
    assert judge("hatsune_miku", "A girl.", placeholders=["general_tags"])[0] is None
    assert judge("hatsune_miku", "A girl.", placeholders=["character_names"])[0] is not None
    assert judge("hatsune_miku", "A girl.", placeholders=["description", "hints"])[0] is None  # no tags carried


def test_an_image_whose_tags_have_no_categories_is_marked_names_unchecked():
    assert judge("hatsune_miku, 1girl", "A girl.", categories={})[1].names_unchecked
    assert not judge("hatsune_miku, 1girl", "Miku.")[1].names_unchecked  # categories known
    assert not judge("1girl, smile", "A girl.", categories={"smile": "general", "somebody": "artist"},
                     placeholders=["general_tags"])[1].names_unchecked  # no name check applies
    assert not judge("hatsune_miku, 1girl", "A girl.", categories={}, placeholders=["general_tags"])[1] \
        .names_unchecked
    assert not judge("", "A girl.", categories={})[1].names_unchecked  # no tags at all


def test_name_words_drop_the_qualifier_and_generic_words():
    assert name_words("kaga_(kantai_collection)") == ["kaga"]
    assert name_words("hatsune_miku") == ["hatsune", "miku"]
    assert name_words("the_girl") == ["the girl"]  # nothing distinctive: the whole name
    assert name_words("2b") == ["2b"]


@pytest.mark.parametrize("kwargs, caption, expected", [
    ({"name": "Aria", "placeholders": ["tags", "name"]}, "A girl reads.", "does not use the name Aria (style.name)"),
    ({"name": "Aria", "placeholders": ["tags", "name"]}, "aria reads.", None),
    ({"name": "Aria", "placeholders": ["tags", "instruction"], "instruction": "refer to them as Aria."},
     "A girl reads.", "does not use the name Aria (style.name)"),
    ({"name": "Aria", "placeholders": ["tags"]}, "A girl reads.", None),  # the prompt never asked for it
    ({"name": "Aria", "placeholders": ["tags", "name"], "prefix": "Aria, "}, "a girl reads.", None),
    ({"name": "sks woman", "placeholders": ["tags", "name"]}, "A woman reads.",
     "does not use the name sks woman (style.name)"),
])
def test_the_name_the_prompt_asked_for_is_used(kwargs, caption, expected):
    trip, _ = judge("1girl, book", caption, **kwargs)
    assert (trip.reason.split(": ", 1)[1] if trip else None) == expected


@pytest.mark.parametrize("omit, caption, expected", [
    (["blue_hair"], "A girl with long blue hair smiles.", "mentions blue hair (style.omit_traits_of: blue_hair)"),
    (["blue_hair"], "A girl with blue-hair smiles.", "mentions blue hair (style.omit_traits_of: blue_hair)"),
    (["blue_hair"], "A girl in a blue dress smiles.", None),
    (["blue_hair"], "A girl with a blue hair ribbon smiles.", None),
    (["twintails"], "Twintails ribbons on her twintails.", "mentions twintails (style.omit_traits_of: twintails)"),
    (["twintails"], "Her hair is tied in a twintail.", "mentions twintails (style.omit_traits_of: twintails)"),
    (["aqua_eyes"], "A girl with teal eyes.", "mentions teal eyes (style.omit_traits_of: aqua_eyes)"),
    (["aqua_eyes"], "A girl with red eyes.", None),
])
def test_omitted_traits_are_absent(omit, caption, expected):
    trip, _ = judge("1girl, solo, smile, " + ", ".join(omit), caption, omit=omit)
    assert (trip.reason.split(": ", 1)[1] if trip else None) == expected
    if trip:
        assert "Do not mention" in trip.correction


COLOURS = [
    ("1girl, solo, red_eyes", "A girl with blue eyes.", "blue eyes"),
    ("1girl, solo, red_eyes", "A blue-eyed girl.", "blue-eyed"),
    ("1girl, solo, red_eyes", "A girl with crimson eyes.", None),
    ("1girl, solo, red_eyes", "A girl with reddish-brown eyes.", None),
    ("1girl, solo, red_eyes", "A girl with red eyes holds a cat with blue eyes.", None),
    ("1girl, solo, red_eyes", "Her eyes are not blue eyes at all.", None),
    ("1girl, solo, red_eyes", "She wears blue eyeshadow and a red eye patch.", None),
    ("1girl, solo, red_eyes, heterochromia", "A girl with blue eyes.", None),
    ("1girl, solo, red_eyes, blue_eyes", "A girl with green eyes.", None),
    ("2girls, red_eyes", "A girl with blue eyes and a friend.", None),
    ("1girl, 1boy, solo_focus, red_eyes", "A girl with blue eyes.", None),
    ("1girl, solo, aqua_eyes", "A girl with blue eyes.", None),
    ("1girl, solo, blonde_hair", "A girl with golden hair.", None),
    ("1girl, solo, blonde_hair", "A girl with long, flowing black hair.", "black hair"),
    ("1girl, solo, blonde_hair", "A black-haired girl.", "black-haired"),
    ("1girl, solo, blonde_hair", "A girl with a red hair ribbon.", None),
    ("1girl, solo, blue_hair", "A girl with blue and white hair.", None),
    ("1girl, solo, blue_hair, multicolored_hair", "A girl with white hair.", None),
    ("1girl, solo, light_blue_hair", "A girl with pink hair.", "pink hair"),
    ("1girl, blue_hair", "A girl with pink hair.", "pink hair"),  # 1girl alone counts one person
    ("blue_hair", "A girl with pink hair.", None),  # no count tag: who knows how many
    ("1girl, solo, red_eyes", "A girl dressed all in black, eyes shining.", None),  # a comma ends the colour
    ("1girl, solo, blonde_hair", "She wears black; hair loose in the wind.", None),
    ("1girl, solo, blonde_hair", "A coat of deep blue \u2014 hair tied back.", None),
    ("1girl, solo, red_hair", "A girl with strawberry blonde hair.", None),  # reddish blonde
    ("1girl, solo, blonde_hair", "A girl with strawberry-blonde hair.", None),
]


@pytest.mark.parametrize("tags, caption, said", COLOURS)
def test_one_eye_or_hair_colour_of_one_person_is_not_contradicted(tags, caption, said):
    trip, _ = judge(tags, caption)
    assert (trip is not None) == (said is not None), trip and trip.reason
    if said:
        tagged = next(tag for tag in tags.split(", ") if tag.endswith(("_eyes", "_hair"))).replace("_", " ")
        assert trip.correction.startswith(f"The tags say {tagged}; the caption says {said}.")


PEOPLE = [
    ("1girl, solo", "Two girls sit on a bench.", "two girls"),
    ("1girl, solo", "An illustration of 2 young girls.", "2 young girls"),
    ("1girl", "Three people walk.", "three people"),
    ("solo", "A pair of friends.", "pair of friends"),
    ("1boy, solo", "Two girls.", "two girls"),
    ("1girl, solo", "A group of students.", "group of students"),
    ("2girls", "A girl stands alone in a field.", "girl stands alone"),
    ("2girls", "Three girls on a beach.", "three girls"),
    ("1girl, solo", "A girl holding a photo of two boys.", None),
    ("1girl, solo", "A girl; two people walk in the background.", None),
    ("1girl, solo", "A girl with no two people around.", None),
    ("1girl, solo", "Two of the girls' cats.", None),
    ("2girls", "Two girls alone in a classroom.", None),
    ("2girls", "One girl sits while the other stands.", None),
    ("2girls, 1boy", "Two girls and a boy.", None),
    ("2girls, 1boy", "Two people talk while a third listens.", None),
    ("6+girls", "Three girls.", None),
    ("multiple_girls, 1boy", "Two boys.", None),
    ("1girl, 1other", "Two girls.", None),
    ("1girl, 1boy, solo_focus", "A girl stands alone.", None),
    ("no_humans", "Two people.", None),
    ("1girl, solo", "A girl with two cats.", None),
    ("1girl, solo", "A girl in a T-shirt printed with two cartoon characters.", None),
    ("1girl, solo", "A girl in a T-shirt printed with two cartoon girls.", None),
    ("1girl, solo", "Her bag has a logo of three girls.", None),
    ("1girl, solo", "A note with three characters written on it.", None),
    ("1girl, solo", "A girl holding two small figures of knights.", None),
    ("1girl, solo", "A girl holding two small figures.", None),
    ("1girl, solo", "One of many students at her academy, she smiles.", None),
    ("1girl, solo", "A scene many people would call idyllic.", None),
    ("1girl, solo", "She is one of several girls in her class.", None),
    ("1girl, solo", "She waves to a few friends.", None),
    ("1girl, solo", "Some people would call it cosy.", None),
    ("1girl, solo", "A scarf with a pattern of two children playing.", None),
    ("1girl, solo", "Two girls sit on a bench, drawn in a soft style.", "two girls"),  # drawn: another clause
    ("1girl, solo", "A trio of girls.", "trio of girls"),
]


@pytest.mark.parametrize("tags, caption, said", PEOPLE)
def test_the_people_count_is_not_contradicted(tags, caption, said):
    trip, _ = judge(tags, caption)
    assert (trip is not None) == (said is not None), trip and trip.reason
    if said:
        assert f"the caption says {said}." in trip.correction


@pytest.mark.parametrize("tags, caption, said", [
    ("smile", "A girl frowning at the rain.", "frowning"),
    ("smile", "A girl, not frowning at all.", None),
    ("smile", "A girl without a frown.", None),
    ("smile, frown, 2girls", "One girl smiles, one has a frown.", None),  # a phrase that is a tag of the image
    ("outdoors", "A girl indoors.", "indoors"),
    ("day", "A street at night.", "at night"),
    ("short_hair", "A girl with long hair.", "long hair"),
    ("short_hair, long_hair, 2girls", "One with long hair.", None),
    ("short_hair", "Short hair tied with a long hair ribbon.", None),
    ("short_hair", "Short hair, a long-hair clip in it.", None),
    ("day", "A dress printed with a night sky pattern.", None),
    ("day", "A shirt printed with a night sky.", None),
    ("day", "A scarf with a print of a city at night.", None),
    ("day", "A picture of a girl at night.", "at night"),  # the caption's own opening
    ("day", "A night sky print on her dress.", None),
    ("day", "A girl under the night sky, a pattern on her dress.", "night sky"),
    ("closed_eyes", "A girl with her eyes open.", "eyes open"),
])
def test_the_shipped_table_of_opposites(tags, caption, said):
    trip, _ = judge(tags, caption)
    assert (trip is not None) == (said is not None), trip and trip.reason
    if said:
        assert f"the caption says {said}." in trip.correction


def test_a_table_line_that_is_not_tag_and_phrases_stops_the_run(tmp_path):
    table = tmp_path / "opposites.txt"
    table.write_text("# mine\ncat: dog, puppy  # a comment\n\nrain sunny\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"line 4 is not `tag: phrase, phrase` \(got 'rain sunny'\)"):
        load_table(table)
    table.write_text("Cat Ears: human ears\n", encoding="utf-8")
    assert load_table(table) == (("cat_ears", ("human ears",)),)
    with pytest.raises(ConfigError, match="guards.contradictions: null for no table of opposites"):
        load_table(tmp_path / "missing.txt")


def test_fresh_and_corrective_retries_are_told_what_to_fix():
    trip, _ = judge("hatsune_miku, 1girl, solo, red_eyes", "A girl with blue eyes.")
    assert trip.guard == "faithfulness" and trip.retry == "corrective"
    assert trip.correction == ("The caption must name Hatsune Miku. The tags say red eyes; the caption says blue "
                               "eyes. Write the caption again with this fixed, and answer with the caption only.")
    assert trip.reason == ("caption not faithful to the tags: does not name Hatsune Miku; says blue eyes where the "
                           "tags say red eyes")
    assert "set guards.faithfulness: warn" in trip.fix
    config = Config()
    config.guards.retry_mode = "fresh"
    values = image_values(["1girl", "solo", "red_eyes"], {}, {}, None, TagFilter(config.tags), filename="a",
                          folder=".", name="", hints="")
    fresh = Faithfulness(config).for_image(values).for_prompt({"tags"})("Blue eyes.")
    assert (fresh.retry, fresh.correction) == ("remind", "The tags say red eyes: do not write blue eyes.")


def test_warn_keeps_the_caption_and_records_the_findings_and_off_checks_nothing():
    trip, check = judge("hatsune_miku, 1girl", "A girl.", mode="warn")
    assert trip is None and check.flags == ["does not name Hatsune Miku"]
    _, off = judge("hatsune_miku", "A girl.", mode="off")
    assert off is None


def test_colour_runs_and_people_counts():
    assert colour_runs(fold("Long, flowing BLACK hair and blue-green eyes."), "hair")[0][1] == "black hair"
    assert {group for groups, _ in colour_runs(fold("blue-green eyes"), "eyes") for group in groups} == \
        {"blue", "green"}
    assert count_people({"2girls", "1boy"}).total == 3
    assert count_people({"solo"}).girls is None
    assert count_people({"solo", "2girls"}) is None  # the tags disagree
    assert count_people({"6+girls"}) is None and count_people({"1girl", "multiple_boys"}) is None


def test_an_omitted_trait_is_held_back_only_on_the_images_that_carry_it():
    """Another character's blue hair, in a folder for a character LoRA, is still said."""
    trip, _ = judge("1girl, solo, smile, blue_hair", "A girl with blue hair smiles.", omit=["blue_hair"])
    assert trip is not None
    trip, check = judge("1girl, solo, smile, red_hair", "A girl with red hair smiles.", omit=["blue_hair"])
    assert trip is None and check.omit == []


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda path: path.name)
def test_the_shipped_templates_ask_for_the_names_whether_or_not_their_list_is_given(path):
    """Without categories the "Named in the tags" list is left out: the prompt must still ask
    for the names the tags hold, not for those of a list that is not there."""
    template = Template.load(path, INTERPRETER_PLACEHOLDERS)
    asked = "Name every character and series the tags name (spelled as under \"Named in the tags\" when that " \
            "list is given), and no character, series or artist the tags do not name."
    for categories, listed in (({}, False), (CHARACTER, True)):
        config = Config()
        values = image_values(["hatsune_miku", "1girl"], {}, categories, None, TagFilter(config.tags),
                              filename="a", folder=".", name="", hints="")
        prompt = template.render(**values, instruction="")
        assert asked in prompt and "hatsune miku" in prompt.lower()
        assert ("Named in the tags (write these names exactly as given):\nCharacters: Hatsune Miku" in prompt) \
            == listed


def test_an_omitted_trait_named_exactly_is_credited_to_its_own_tag():
    trip, check = judge("1girl, solo, blue_hair, aqua_hair", "A girl with blue hair.", omit=["aqua_hair", "blue_hair"])
    assert trip.reason.split(": ", 1)[1] == "mentions blue hair (style.omit_traits_of: blue_hair)"
