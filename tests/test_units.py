"""Small pure pieces: tag parsing, template filling, reply cleaning, error messages, config."""
import os

import pytest

from tagcaption.config import load_config
from tagcaption.errors import ConfigError
from tagcaption.tagfiles import decode_text, display_tag, normalize_tag, parse_tags
from tagcaption.replies import clean_reply
from tagcaption.templates import Template


def test_tags_are_trimmed_normalised_and_deduplicated():
    assert parse_tags(" long hair, long_hair ,Long Hair,, blue_eyes\n1girl,\n") == ["long_hair", "blue_eyes", "1girl"]


def test_escaped_parentheses_from_sd_prompts_are_unescaped():
    assert normalize_tag("cloud_strife_\\(final_fantasy\\)") == "cloud_strife_(final_fantasy)"


def test_display_keeps_short_emoticons():
    assert display_tag("long_hair") == "long hair" and display_tag("^_^") == "^_^"


@pytest.mark.parametrize("data", ["café, ñ".encode("utf-8"), b"\xef\xbb\xbfcaf\xc3\xa9, \xc3\xb1",
                                  "café, ñ".encode("latin-1")])
def test_tag_files_in_utf8_bom_or_latin1(data):
    assert parse_tags(decode_text(data)) == ["café", "ñ"]


def test_template_inserts_values_literally():
    template = Template("Tags: {tags}; {{literal}}", ["tags"], "t")
    assert template.render(tags="{0.__class__} {tags} }{") == "Tags: {0.__class__} {tags} }{; {literal}"


@pytest.mark.parametrize("text, fragment", [
    ("{mood}", "unknown placeholder {mood}"),
    ("{0}", "is not a plain name"),
    ("{tags.__class__}", "is not a plain name"),
    ("{tags!r}", "is not a plain name"),
    ("{tags:>10}", "is not a plain name"),
    ("{tags", "literal braces"),
])
def test_bad_templates_are_rejected_with_file_name(text, fragment):
    with pytest.raises(ConfigError) as error:
        Template(text, ["tags"], "templates/mine.txt")
    assert fragment in str(error.value) and "templates/mine.txt" in str(error.value)


@pytest.mark.parametrize("raw, clean", [
    ("<think>hmm</think>\nA cat.", "A cat."),
    ("reasoning without opening tag</think>A cat.", "A cat."),
    ("<THINK>a</THINK> <think>b</think>A dog.", "A dog."),
    ("  plain  ", "plain"),
])
def test_reasoning_is_stripped(raw, clean):
    assert clean_reply(raw) == clean


def test_api_key_from_environment(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("endpoints:\n  cloud:\n    base_url: https://api.openai.com/v1\n"
                      "    api_key: ${oc.env:TEST_CAPTION_KEY}\n")
    monkeypatch.setenv("TEST_CAPTION_KEY", "sk-test")
    assert load_config(str(config)).endpoints["cloud"].api_key == "sk-test"
    monkeypatch.delenv("TEST_CAPTION_KEY")
    with pytest.raises(ConfigError, match="endpoints.cloud.api_key"):
        load_config(str(config))


def test_stage_must_name_a_defined_endpoint(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("endpoints:\n  vision: {base_url: 'http://localhost:8000/v1'}\n")
    with pytest.raises(ConfigError, match="interpreter.endpoint 'defualt' is not defined.*did you mean 'default'"):
        load_config(str(config), ["interpreter.endpoint=defualt"])


def test_shipped_config_loads_with_documented_defaults():
    config = load_config()
    assert config.endpoints["default"].base_url == "http://localhost:1234/v1"
    assert config.tag_provider.danbooru_url == "https://danbooru.donmai.us"
    assert config.output.overwrite is False and config.interrogator.skip is True
    assert config.interpreter.prompt_template == "auto"
    from tagcaption.variants import build_variants, caption_template
    (variant,) = build_variants(config, "interpreter")
    assert caption_template(config, variant).endswith("_short_no_description.txt")
    assert os.path.isfile(config.resource(caption_template(config, variant)))
