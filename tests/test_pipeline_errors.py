"""End-to-end runs of caption.py against the loopback fake servers when something is wrong:
a setup error (an unknown placeholder, a config typo or a wrong type, an unreachable server, a
base_url without its /v1) stops the run with exit 2 before any request; an image that fails (a
server error in any server's format, a truncated or empty reply, no tags, an unreadable tags
file) is reported in one line and the batch goes on.
"""
from __future__ import annotations

import pytest

from conftest import make_dataset, run_caption, run_caption_process, write_config
from fake_servers import Error, Text, user_text


def test_template_with_unknown_placeholder_stops_before_any_request(tmp_path, llm_server, danbooru, capsys):
    template = tmp_path / "mine.txt"
    template.write_text("Tags: {tags}\nMood: {mood}\n")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          interpreter={"prompt_template": "mine.txt"})
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 2
    assert "{mood}" in err and str(template) in err
    assert llm_server.requests == [] and danbooru.requests == []
    assert not (images / "a.tags.txt").exists()


def test_config_typo_names_key_and_suggestion(tmp_path, llm_server, danbooru):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          interpreter={"temprature": 0.2})
    result = run_caption_process([str(images), "--config", str(config)])
    assert result.returncode == 2
    assert "unknown config key 'interpreter.temprature'; did you mean 'interpreter.temperature'?" in result.stderr
    assert "Traceback" not in result.stderr

    result = run_caption_process([str(images), "--config", str(config), "interpreter.temprature=0.2",
                                  "endpoints.default.concurrency=many"])
    assert result.returncode == 2 and "interpreter.temprature" in result.stderr


def test_wrong_type_names_key_and_type(tmp_path, llm_server, danbooru, capsys):
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, _, err = run_caption([str(tmp_path), "--config", str(config), "endpoints.default.max_retries=many"],
                               capsys)
    assert code == 2
    assert "endpoints.default.max_retries: expected a whole number" in err


def test_unreachable_server_stops_with_exit_2_before_touching_files(tmp_path, danbooru):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    before = sorted(p.name for p in images.iterdir())
    config = write_config(tmp_path / "config.yaml", "http://127.0.0.1:9/v1", danbooru.url)
    result = run_caption_process([str(images), "--config", str(config)])
    assert result.returncode == 2
    assert "http://127.0.0.1:9/v1" in result.stderr and "LM Studio" in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in images.iterdir()) == before
    assert not (tmp_path / "tags_cache.json").exists()
    assert danbooru.requests == []


def test_failed_image_is_reported_and_batch_goes_on(tmp_path, llm_server, danbooru, capsys):
    def respond(request):
        if "sad" in user_text(request):
            return Error(400, {"object": "error", "message": "This model's maximum context length is 4096 tokens.",
                               "type": "BadRequestError", "param": None, "code": 400})
        return Text("<think>the user wants a caption</think>A fine caption.")
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "happy", "b.png": "sad", "c.png": "happy"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          tag_provider={"skip": True})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    assert "2 captioned, 0 skipped (caption exists), 1 failed" in out
    assert f"{images / 'b.png'}: endpoint 'default' ({llm_server.base_url}): HTTP 400: " \
           "This model's maximum context length is 4096 tokens." in out
    assert (images / "a.txt").read_text() == "A fine caption."
    assert (images / "b.txt").read_text() == "sad" and not (images / "b.tags.txt").exists()


def test_truncated_or_empty_reply_is_never_saved(tmp_path, llm_server, danbooru, capsys):
    def respond(request):
        if "long" in user_text(request):
            return Text("A caption that was cut", finish_reason="length")
        return Text("<think>only thinking, no answer</think>  ")
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "long", "b.png": "short"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          tag_provider={"skip": True}, endpoints={"default": {"stream": False}})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "2 failed" in out
    assert "cut off at max_tokens" in out and "empty reply" in out
    assert (images / "a.txt").read_text() == "long" and (images / "b.txt").read_text() == "short"
    assert not list(images.glob("*.tags.txt"))


def test_images_without_tags_in_tags_only_mode_fail_clearly(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": None, "b.png": " , "})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "2 failed" in out and "nothing to caption from" in out
    assert llm_server.chat_requests == []


def test_unreadable_tags_file_fails_only_that_image(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    (images / "b.txt").unlink()
    (images / "b.txt").mkdir()  # a folder where the tags file should be: unreadable as a file
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          tag_provider={"skip": True}, output={"extension": ".caption"})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "1 captioned" in out and "1 failed" in out
    assert "cannot read tags file" in out and "b.txt" in out


@pytest.mark.parametrize("body, message", [
    ({"error": {"message": "OpenAI style", "type": "invalid_request_error", "param": None, "code": None}},
     "OpenAI style"),
    ({"error": "LM Studio plain string"}, "LM Studio plain string"),
    ({"object": "error", "message": "vLLM style", "type": "BadRequestError", "param": None, "code": 400},
     "vLLM style"),
    ({"error": {"code": 400, "message": "llama.cpp style", "type": "invalid_request_error"}}, "llama.cpp style"),
    ([{"error": {"code": 400, "message": "Gemini list", "status": "INVALID_ARGUMENT"}}], "Gemini list"),
    ("<html><body>nginx 400</body></html>", "<html><body>nginx 400</body></html>"),
])
def test_every_servers_error_body_becomes_one_line(tmp_path, llm_server, danbooru, capsys, body, message):
    llm_server.responder = lambda request: Error(400, body)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    assert f"a.png: endpoint 'default' ({llm_server.base_url}): HTTP 400: {message}\n" in out


def test_no_tags_says_where_it_looked_and_that_the_txt_is_our_caption(tmp_path, llm_server, vision_server, danbooru,
                                                                      capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": None})
    vision_server.responder = lambda request: Text("A red rectangle.")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          interrogator={"skip": False, "endpoint": "vision"}, interpreter={"skip": True},
                          endpoints={"default": {"base_url": llm_server.base_url},
                                     "vision": {"base_url": vision_server.base_url}})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and (images / "a.txt").read_text() == "A red rectangle."
    code, out, err = run_caption([str(images), "--config", str(config), "output.overwrite=true",
                                  "interrogator.skip=true", "interpreter.skip=false"], capsys)
    assert code == 1
    assert "a.png: no tags (a.txt is a caption this program wrote; tags would be in a.tags.txt; no sidecar " \
           "with tags) and the Interrogator is off" in err
    assert (images / "a.txt").read_text() == "A red rectangle."


def test_a_base_url_without_its_v1_is_named_before_any_caption(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.url, danbooru.url, tag_provider={"skip": True})
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 2 and f"answers at {llm_server.url}/v1, not at {llm_server.url}: set " \
                         f"endpoints.default.base_url={llm_server.url}/v1" in err
    assert not llm_server.chat_requests and not (images / "a.caption").exists()
