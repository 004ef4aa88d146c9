"""Issue 14's corpus, part 4: secrets. A configured key never appears on the terminal or in
any file the program writes (captions, failures.jsonl, captions.jsonl, metadata.jsonl,
.tagcaption/*, the tag cache, --debug-dir transcripts, the review page), nor in `check`,
`--dry-run` or config errors, in any form: as given, JSON-escaped, URL-encoded, HTML-escaped
on the page, and Danbooru's `login:api_key` as base64. A reply that carries a key is never
saved as a caption.

Each case makes keys of its own: the program remembers every key it was given for the life
of the process, so a key shared between in-process cases could be redacted in one only
because another registered it.
"""
from __future__ import annotations

import json
import uuid

import pytest

from conftest import make_dataset, run_caption
from fake_servers import user_text
from hostile_config import with_danbooru as danbooru_config, short_config
from hostile_servers import (Raw, Say, assert_no_secret, booru, llm, no_traceback, one_error_line,  # noqa: F401
                             secret_forms)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def key():
    """A key full of characters that change when escaped: JSON (\\ and "), URLs (/ + & =)."""
    return f'sk-test/SECRET+1234&x="{uuid.uuid4().hex[:8]}"\\end'


@pytest.fixture
def plain_key():
    """A key that survives being a tag name (lowercase, no spaces or underscores)."""
    return f"sk-test-secret-{uuid.uuid4().hex[:10]}"


def config_for(tmp_path, llm, booru, **sections):
    return short_config(tmp_path, llm, booru, defaults={"guards": {"max_attempts": 2}}, **sections)


def with_danbooru(tmp_path, llm, booru, **sections):
    return danbooru_config(config_for, tmp_path, llm, booru, **sections)


def every_sink(tmp_path):
    return ["output.formats=[txt,jsonl,metadata]", "output.report=true", "--debug-dir", str(tmp_path / "debug")]


def test_keys_echoed_by_both_servers_reach_no_sink(tmp_path, llm, booru, capsys, key):
    """The LLM server quotes its Authorization header in an error; Danbooru quotes its basic
    auth in an error object; every output and every file is searched for every form."""
    booru_key = f"danbooru&{key}"

    def llm_refuses_dog(request, headers):
        if "dog" in user_text(request):
            return Raw(400, json.dumps({"error": {"message": f"bad request from {headers.get('authorization')}",
                                                  "type": "invalid_request_error"}}).encode())
        return None
    llm.hostile = llm_refuses_dog
    booru.override = lambda path: (200, {"success": False, "message": f"who is {booru.headers().get('authorization')} "
                                                                      f"({booru_key})?"}, "application/json")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = with_danbooru(tmp_path, llm, booru, tag_provider={"login": "someone"})
    code, out, err = run_caption([str(images), "--config", str(config), f"endpoints.default.api_key={key}",
                                  f"tag_provider.api_key={booru_key}", *every_sink(tmp_path)], capsys)
    assert code == 1, err
    no_traceback(out, err)
    assert all(r.headers.get("authorization") == f"Bearer {key}" for r in llm.requests)  # it was used
    assert "bad request from Bearer ***" in out and "***" in err
    assert (images / "a.txt").read_text() == "A picture of cat."
    forms = secret_forms(key) + secret_forms(booru_key, login="someone")
    assert_no_secret(forms, [out, err], [tmp_path])


def test_a_reply_echoing_a_prompt_that_carries_the_key_is_never_saved(tmp_path, llm, booru, capsys, plain_key):
    """A tag holding the key goes into the prompt (the user put it there); a server echoing the
    prompt must not get it saved as a caption, cached, journaled or shown."""
    llm.hostile = lambda request, headers: Say("An echo: " + user_text(request).replace("\n", " "))
    booru.wiki = {"cat": "A small feline."}
    images = tmp_path / "images"
    make_dataset(images, {"a.png": f"cat, {plain_key}"})
    config = with_danbooru(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), f"endpoints.default.api_key={plain_key}",
                                  *every_sink(tmp_path)], capsys)
    assert code == 1, err
    no_traceback(out, err)
    assert any(plain_key in user_text(r) for r in llm.chat_requests)  # it was in the prompt
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "API key" in failed[0], err
    assert (images / "a.txt").read_text() == f"cat, {plain_key}"  # no caption over the tags
    assert_no_secret(secret_forms(plain_key), [out, err], [tmp_path], allowed=[images / "a.txt"])


@pytest.mark.parametrize("form", ["as-given", "url-encoded", "json-escaped"])
def test_a_reply_echoing_the_authorization_header_is_never_saved(tmp_path, llm, booru, capsys, key, form):
    from urllib.parse import quote

    def echo(request, headers):
        value = headers.get("authorization", "")[len("Bearer "):]
        shown = {"as-given": value, "url-encoded": quote(value, safe=""), "json-escaped": json.dumps(value)[1:-1]}
        return Say(f"A cat seen by {shown[form]} today.")
    llm.hostile = echo
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), f"endpoints.default.api_key={key}",
                                  *every_sink(tmp_path)], capsys)
    assert code == 1, err
    no_traceback(out, err)
    assert (images / "a.txt").read_text() == "cat" and not (images / "a.tags.txt").exists()
    assert_no_secret(secret_forms(key), [out, err], [tmp_path])


def test_a_key_from_the_environment_reaches_no_sink(tmp_path, llm, booru, capsys, key, monkeypatch):
    monkeypatch.setenv("TAGCAPTION_HOSTILE_KEY", key)
    llm.hostile = lambda request, headers: Raw(400, json.dumps({"error": {
        "message": f"key {headers.get('authorization')} is not allowed"}}).encode())
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm, booru, endpoints={"default": {"api_key": "${oc.env:TAGCAPTION_HOSTILE_KEY}"}})
    code, out, err = run_caption([str(images), "--config", str(config), *every_sink(tmp_path)], capsys)
    assert code == 1, err
    no_traceback(out, err)
    assert "is not allowed" in err
    assert_no_secret(secret_forms(key), [out, err], [tmp_path])


def test_a_key_refused_at_start_is_not_shown(tmp_path, llm, booru, capsys, key):
    llm.refuse_all = True
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), f"endpoints.default.api_key={key}"], capsys)
    assert code == 2
    one_error_line(err, "refused the API key")
    assert_no_secret(secret_forms(key), [out, err], [tmp_path])


def test_dry_run_output_and_transcripts_show_no_key(tmp_path, llm, booru, capsys, plain_key):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": f"cat, {plain_key}"})
    config = config_for(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), f"endpoints.default.api_key={plain_key}",
                                  "--dry-run", "--debug-dir", str(tmp_path / "debug")], capsys)
    assert code == 0, err
    no_traceback(out, err)
    assert "TAGS: cat, ***" in out  # the prompt is shown, the key is not
    assert list((tmp_path / "debug").iterdir())
    assert_no_secret(secret_forms(plain_key), [out, err], [tmp_path], allowed=[images / "a.txt"])


def test_check_shows_no_key_a_refusal_quotes(tmp_path, llm, booru, capsys, key):
    from urllib.parse import quote
    llm.hostile = lambda request, headers: Raw(401, json.dumps({"error": {
        "message": f"invalid key {quote(headers.get('authorization', ''), safe='')}"}}).encode())
    config = config_for(tmp_path, llm, booru)
    code, out, err = run_caption(["check", "--config", str(config), f"endpoints.default.api_key={key}"], capsys)
    assert code == 2
    no_traceback(out, err)
    assert_no_secret(secret_forms(key), [out, err])


def test_the_review_page_shows_no_key_even_html_escaped(tmp_path, llm, booru, capsys):
    page_key = f'sk-test&secret"{uuid.uuid4().hex[:8]}'
    images = tmp_path / "images"
    make_dataset(images, {"a.png": f"cat, {page_key}"})
    config = config_for(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), f"endpoints.default.api_key={page_key}",
                                  "output.report=true"], capsys)
    assert code == 1, err  # the caption would carry the key: refused
    no_traceback(out, err)
    assert_no_secret(secret_forms(page_key), [out, err], [tmp_path], allowed=[images / "a.txt"])


INTERPOLATED = [
    "endpoints.default.concurrency=${endpoints.default.api_key}",
    "output.extension=${endpoints.default.api_key}",
    "interpreter.endpoint=${endpoints.default.api_key}",
    "endpoints.default.base_url=${endpoints.default.api_key}",
    "tags.combine=${endpoints.default.api_key}",
]


@pytest.mark.parametrize("override", INTERPOLATED, ids=[item.split("=")[0] for item in INTERPOLATED])
def test_a_config_error_quoting_an_interpolated_key_shows_no_key(tmp_path, llm, booru, capsys, key, override):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), f"endpoints.default.api_key={key}",
                                  override], capsys)
    assert code == 2
    one_error_line(err, override.split("=")[0])
    assert_no_secret(secret_forms(key), [out, err])


@pytest.mark.parametrize("override", ["endpoints.default.api_key={{k: {key}}}", "tag_provider.api_key=[x, {key}]"],
                         ids=["mapping", "list"])
def test_a_key_of_the_wrong_type_is_not_quoted_in_its_error(tmp_path, llm, booru, capsys, plain_key, override):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), override.format(key=plain_key)], capsys)
    assert code == 2
    one_error_line(err, "api_key")
    assert_no_secret(secret_forms(plain_key), [out, err])


# --- a key cut short is still a key: masked before any message is shortened -------------------

def pieces(key: str, size: int = 12):
    """Every run of `size` characters of the key: what a message cut anywhere in it would keep."""
    return [key[start:start + size] for start in range(len(key) - size + 1)]


def test_a_key_in_a_long_error_is_masked_before_the_message_is_cut(tmp_path, llm, booru, capsys):
    key = "sk-proj-" + (uuid.uuid4().hex * 2)[:44]  # 52 characters, as OpenAI's project keys
    message = "Invalid request. " + "x" * 222 + " key was " + key + " (rejected)"
    llm.hostile = lambda request, headers: Raw(400, json.dumps({"error": {"message": message}}).encode())
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), f"endpoints.default.api_key={key}",
                                  *every_sink(tmp_path)], capsys)
    assert code == 1, err
    no_traceback(out, err)
    assert "key was *** (rejected)" in err
    failure = json.loads((images / "failures.jsonl").read_text())
    assert "key was *** (rejected)" in failure["message"]
    assert_no_secret(pieces(key), [out, err], [tmp_path])


def structured_config(tmp_path, llm, booru, template_text):
    schema = {"type": "object", "properties": {"subject": {"type": "string"},
                                               "style": {"enum": ["photo", "anime", "sketch"]},
                                               "note": {"type": "string"}},
              "required": ["subject", "style"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "caption.txt").write_text(template_text)
    return config_for(tmp_path, llm, booru, interpreter={"response_schema": str(tmp_path / "schema.json"),
                                                         "response_template": str(tmp_path / "caption.txt")})


@pytest.mark.parametrize("field", ["style", "note"], ids=["an enum error quoting it", "a field left out"])
def test_a_key_escaped_inside_a_structured_reply_is_never_saved_or_shown(tmp_path, llm, booru, capsys, field):
    r"""The reply writes the key as `\u0073k-…` inside a JSON string, which the raw reply text
    does not show: the enum error quoting 60 characters of the value would keep a piece of it,
    and a field the template leaves out would keep it whole in .caption.json."""
    key = "sk-TOPSECRET-" + uuid.uuid4().hex[:10]
    hidden = "\\u0073" + key[1:]
    value = "a girl seen by somebody who goes by the name " + hidden  # the cut at 60 falls inside the key
    reply = '{"subject": "a girl", "style": "photo", "%s": "%s"}' % (field, value) if field == "note" else \
        '{"subject": "a girl", "style": "%s"}' % value
    llm.hostile = lambda request, headers: Say(reply)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = structured_config(tmp_path, llm, booru, "{style} of {subject}.")
    code, out, err = run_caption([str(images), "--config", str(config), f"endpoints.default.api_key={key}",
                                  *every_sink(tmp_path)], capsys)
    assert code == 1, err
    no_traceback(out, err)
    failure = json.loads((images / "failures.jsonl").read_text())
    assert "API key" in failure["message"] and failure["kind"] == "guard_secret", failure
    assert (images / "a.txt").read_text() == "cat" and not (images / "a.caption.json").exists()
    assert_no_secret(pieces(key), [out, err], [tmp_path])
