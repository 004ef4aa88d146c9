"""load_config refuses what the program cannot run with, one message naming the key."""
import pytest

from tagcaption.config import load_config
from tagcaption.errors import ConfigError
from tagcaption.hints import sources_problem
from tagcaption.outputs import check_formats


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("interpreter:\n  model: instruct-model\n", encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("override, message", [
    ("output.formats=[jsonl]", "output.formats must include txt"),
    ("output.formats=[txt,parquet]", "output.formats: unknown format(s) parquet (use txt, jsonl, metadata)"),
    ("interpreter.max_tokens=0", "interpreter.max_tokens must be at least 1"),
    ("endpoints.default.concurrency=0", "endpoints.default.concurrency must be between 1 and 1024, or auto (got 0)"),
    ("endpoints.default.concurrency=1000000", "endpoints.default.concurrency must be between 1 and 1024, or auto"),
    ("endpoints.default.concurrency=many", "endpoints.default.concurrency must be a whole number or auto (got 'many')"),
    ("endpoints.default.concurrency=2.5", "endpoints.default.concurrency must be a whole number or auto (got 2.5)"),
    ("endpoints.default.request_timeout=0", "endpoints.default.request_timeout must be more than 0 seconds"),
    ("endpoints.default.max_reply_bytes=0", "endpoints.default.max_reply_bytes must be at least 1"),
    ("endpoints.default.stop_after_failures=0", "endpoints.default.stop_after_failures must be at least 1"),
    ("interpreter.max_tag_descriptions=-1", "interpreter.max_tag_descriptions must be 0 or more (got -1; null: every summary)"),
    ("interpreter.tag_descriptions_tokens=-5", "interpreter.tag_descriptions_tokens must be 0 or more (got -5; null: no budget)"),
    ("endpoints.default.transport=http2", "endpoints.default.transport must be auto or httpx (got 'http2')"),
    ("endpoints.default.base_url=http://127.000.000.001:1/v1", "is not a URL the client can use: Invalid IPv4"),
    ("endpoints.default.base_url=http://:80/v1", "base_url 'http://:80/v1' is not a URL the client can use: no host"),
    ('endpoints.default.api_key="sk-abc\\ndef"', "endpoints.default.api_key holds a line break, a control character"),
    ("endpoints.default.api_key=sk-abc€def", "a key is printable ASCII, so copy it again"),
    ("tags.exclude=[[1]]", "tags.exclude: expected a list such as [absurdres,watermark] (text only), got [1] in it"),
    ("interpreter.prompt_variants=[x]", "interpreter.prompt_variants[0]: each entry is a mapping of keys, such as "
                                        "{style: descriptive, weight: 2}"),
    ("guards.max_attempts=0", "guards.max_attempts must be between 1 and 20 (got 0)"),
    ("interrogator.jpeg_quality=101", "interrogator.jpeg_quality must be between 1 and 100"),
    ("tag_provider.source=booru", "tag_provider.source must be danbooru, file or none (got 'booru')"),
    ("tags.combine=some", "tags.combine must be first or all (got 'some')"),
    ("tags.exclude_categories=[meta,nsfw]",
     "tags.exclude_categories: unknown category nsfw (use general, artist, copyright, character, meta)"),
    ("guards.retry_mode=again", "guards.retry_mode must be fresh or corrective (got 'again')"),
    ("guards.expected_script=runic",
     "guards.expected_script must be one of any, latin, cyrillic, greek, cjk, arabic, hebrew"),
    ("interrogator.image_format=gif", "interrogator.image_format must be auto, jpeg, png or original (got 'gif')"),
    ("endpoints.default.token_limit_param=limit",
     "endpoints.default.token_limit_param must be max_tokens or max_completion_tokens"),
    ("output.variants=0", "output.variants must be between 1 and 20 (got 0)"),
    ("output.variants=1000", "output.variants must be between 1 and 20 (got 1000)"),
    ("output.variants=2.5", "output.variants: expected a whole number, got 2.5"),
    ("endpoints.default.structured_output=tools",
     "endpoints.default.structured_output must be json_schema or none (got 'tools'"),
    ("interpreter.response_template=templates/structured/caption.txt",
     "interpreter.response_template writes the caption from a structured one: set interpreter.response_schema too"),
])
def test_a_value_the_program_cannot_use_is_refused_when_the_config_is_read(config_file, override, message):
    with pytest.raises(ConfigError) as raised:
        load_config(config_file, [override])
    assert message in str(raised.value)


def test_a_response_schema_needs_the_interpreter(config_file):
    with pytest.raises(ConfigError) as raised:
        load_config(config_file, ["interpreter.skip=true", "interrogator.skip=false",
                                  "interpreter.response_schema=templates/structured/caption.schema.json"])
    assert "interpreter.response_schema asks the Interpreter for a JSON object, but interpreter.skip is true" \
        in str(raised.value)


def test_a_skipped_stage_may_keep_any_token_limit(config_file):
    load_config(config_file, ["tag_provider.skip=true", "tag_provider.max_tokens=0"])


def test_the_format_and_hint_source_checks_stay_callable():
    assert check_formats(["txt", "metadata"]) is None
    assert sources_problem(["full_path", "bogus"]) == "interrogator.hint_sources: unknown source(s) bogus"
    assert sources_problem(["full_path"]) is None
