"""Tag knowledge (issue 4), continued: Danbooru's etiquette and faults (a 429 and request
pacing, an HTML or malformed answer, an unreachable host, a JSON error, the login and key) and
the tag cache (a changed summary model, no-wiki answers that expire, a damaged cache moved
aside, the original script's cache reused).

The helpers, the `template` fixture and `config_for` come from test_tags.py.
"""
from __future__ import annotations

import base64
import json
import time

import pytest

from conftest import make_dataset, run_caption, write_config
from test_tags import caption_prompts, config_for, summarising, template  # noqa: F401


def test_rate_limit_429_then_success_and_request_pacing(tmp_path, llm_server, danbooru, template, capsys):
    danbooru.wiki = {"cat": "A cat.", "dog": "A dog."}
    calls = []

    def override(path):
        calls.append(time.monotonic())
        if len(calls) == 1:
            return 429, "<html><body>429 Too Many Requests</body></html>", "text/html", {"Retry-After": "1"}
        return None
    danbooru.override = override
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = config_for(tmp_path, llm_server, danbooru, template,
                        tag_provider={"danbooru_rate": 4, "danbooru_batch_size": 1, "danbooru_concurrency": 1})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert "2 summarised" in out
    assert calls[1] - calls[0] >= 1.0  # Retry-After honoured
    assert all(b - a >= 0.24 for a, b in zip(calls, calls[1:]))  # at most 4 requests a second


@pytest.mark.parametrize("status, body, content_type, expected", [
    (403, "<!DOCTYPE html><html><title>Just a moment...</title></html>", "text/html",
     "answered HTTP 403 with an HTML page instead of its API (a Cloudflare challenge"),
    (200, "<html>maintenance</html>", "text/html", "answered HTTP 200 with an HTML page instead of its API"),
    (200, "{not json", "application/json", "sent malformed JSON"),
])
def test_danbooru_faults_are_one_clear_line_and_captions_go_on(tmp_path, llm_server, danbooru, template, capsys,
                                                               status, body, content_type, expected):
    danbooru.override = lambda path: (status, body, content_type)
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = config_for(tmp_path, llm_server, danbooru, template)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0
    assert "2 captioned" in out and "not looked up (lookup error)" in out
    assert err.count(expected) == 1, err
    assert "Traceback" not in err
    cache = json.loads((tmp_path / "tags_cache.json").read_text())["tags"] if (tmp_path / "tags_cache.json").exists() else {}
    assert cache == {}  # a failed lookup is not remembered as "no wiki page"


def test_unreachable_danbooru_still_captions_with_tags_only(tmp_path, llm_server, template, capsys):
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, "http://127.0.0.1:9",
                          tag_provider={"danbooru_retries": 1}, interpreter={"prompt_template": str(template)})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0
    assert "2 captioned" in out and "captions were made with tags only" in out
    assert err.count("cannot reach Danbooru at http://127.0.0.1:9") == 1
    assert sorted(p.split(">", 1)[0] for p in caption_prompts(llm_server)) == ["TAGS<cat", "TAGS<dog"]


def test_login_and_api_key_are_sent_and_never_shown(tmp_path, llm_server, danbooru, template, capsys):
    llm_server.responder = summarising
    danbooru.override = lambda path: (403, "<html>denied</html>", "text/html")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm_server, danbooru, template,
                        tag_provider={"login": "alice", "api_key": "danbooru-secret-key-42"})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0
    expected = "Basic " + base64.b64encode(b"alice:danbooru-secret-key-42").decode()
    assert danbooru.requests[0].headers["authorization"] == expected
    assert "danbooru-secret-key-42" not in out + err


def test_changing_the_summary_model_resummarises_from_cached_wiki(tmp_path, llm_server, danbooru, template, capsys):
    danbooru.wiki = {"cat": "A cat."}
    llm_server.responder = summarising
    llm_server.models.append("better-model")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat, unknown_tag"})
    config = config_for(tmp_path, llm_server, danbooru, template)
    args = [str(images), "--config", str(config), "output.overwrite=true"]
    run_caption(args, capsys)
    looked_up = len(danbooru.requests)

    code, out, _ = run_caption(args + ["tag_provider.model=better-model"], capsys)
    assert code == 0 and "1 summarised again (model or template changed)" in out
    assert len(danbooru.requests) == looked_up
    assert llm_server.chat_requests[-2]["model"] == "better-model"
    cache = json.loads((tmp_path / "tags_cache.json").read_text())["tags"]
    assert cache["cat"]["model"] == "better-model" and cache["cat"]["wiki"] == "A cat."

    code, out, _ = run_caption(args + ["tag_provider.model=better-model"], capsys)
    assert "0 summarised, 2 cached" in out

    code, out, _ = run_caption(args + ["tag_provider.model=better-model", "--refresh-tags"], capsys)
    assert "1 summarised, 0 cached, 1 without wiki" in out and len(danbooru.requests) > looked_up


def test_no_wiki_answers_expire(tmp_path, llm_server, danbooru, template, capsys):
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "newtag"})
    config = config_for(tmp_path, llm_server, danbooru, template, tag_provider={"negative_ttl_days": 1})
    args = [str(images), "--config", str(config), "output.overwrite=true"]
    run_caption(args, capsys)
    cache_file = tmp_path / "tags_cache.json"
    data = json.loads(cache_file.read_text())
    data["tags"]["newtag"]["checked"] = time.time() - 2 * 86400
    cache_file.write_text(json.dumps(data))
    danbooru.wiki = {"newtag": "Written since."}
    code, out, _ = run_caption(args, capsys)
    assert "1 summarised" in out and danbooru.looked_up() == ["newtag", "newtag"]


def test_corrupt_cache_is_moved_aside_not_emptied(tmp_path, llm_server, danbooru, template, capsys):
    danbooru.wiki = {"cat": "A cat."}
    llm_server.responder = summarising
    (tmp_path / "tags_cache.json").write_text('{"version": 2, "tags": {"cat": {"summary": "Trunc')
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm_server, danbooru, template)
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "tag cache" in err and "is damaged" in err
    aside = list(tmp_path.glob("tags_cache.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text().endswith('"Trunc')
    assert json.loads((tmp_path / "tags_cache.json").read_text())["tags"]["cat"]["summary"] == "Means cat."


def test_original_scripts_cache_is_reused(tmp_path, llm_server, danbooru, template, capsys):
    (tmp_path / "tags_cache.json").write_text(json.dumps({"cat": "A small feline."}))
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm_server, danbooru, template)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "1 cached" in out and danbooru.requests == []
    assert "cat: A small feline." in caption_prompts(llm_server)[0]


def test_a_json_error_from_danbooru_is_not_cached_as_missing(tmp_path, llm_server, danbooru, template, capsys):
    danbooru.override = lambda path: (200, {"success": False, "error": "RateLimiter::RateLimitError",
                                            "message": "You're doing that too fast"}, "application/json")
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm_server, danbooru, template)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "You're doing that too fast" in err and "0 without wiki" in out
