"""Lone and split UTF-16 surrogates in replies: a server that streams an emoji's two halves in
two events (each escaped in its own JSON), or sends half of one, must not fail the image on
writing it ("surrogates not allowed"). Against the loopback servers."""
from __future__ import annotations

import json

from conftest import make_dataset, run_caption, write_config
from fake_servers import Fault, Text


def event(content: str = "", finish=None) -> str:
    chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": "instruct-model",
             "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    return f"data: {json.dumps(chunk)}\n\n"  # json.dumps writes a lone surrogate as its \\u escape


def config(tmp_path, server, danbooru, **sections):
    sections.setdefault("tag_provider", {"source": "none"})
    return write_config(tmp_path / "config.yaml", server.base_url, danbooru.url, **sections)


def written(images, name="a.txt"):
    return (images / name).read_text(encoding="utf-8")


def test_an_emoji_streamed_in_two_halves_is_one_emoji(tmp_path, llm_server, danbooru, capsys):
    events = event("A smiling girl \ud83d") + event("\ude00 with red eyes.") + event("", "stop") + "data: [DONE]\n\n"
    llm_server.responder = lambda request: Fault("raw", data=events.encode())
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "girl, smile, red eyes"})
    path = config(tmp_path, llm_server, danbooru, output={"formats": ["txt", "jsonl"]})

    code, out, err = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out + err
    assert written(images) == "A smiling girl \U0001F600 with red eyes."
    assert json.loads(written(images, "captions.jsonl"))["caption"] == "A smiling girl \U0001F600 with red eyes."


def test_a_lone_surrogate_in_a_caption_is_dropped(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Text("A smiling girl\ud800 with red eyes, \ufffd kept.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "girl, smile, red eyes"})
    path = config(tmp_path, llm_server, danbooru, endpoints={"default": {"stream": False}})

    code, out, err = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out + err
    assert written(images) == "A smiling girl with red eyes, \ufffd kept.", "a real U+FFFD is the reply's own"


def test_a_lone_surrogate_in_a_structured_field_is_dropped(tmp_path, llm_server, danbooru, capsys):
    schema = {"type": "object", "properties": {"subject": {"type": "string"}, "mood": {"type": "string"}},
              "required": ["subject", "mood"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "caption.txt").write_text("{subject}, {mood}.")
    reply = json.dumps({"subject": "a girl\ud800", "mood": "happy \ud83d\ude00"})  # escaped: \\ud800
    assert "\\ud800" in reply
    llm_server.responder = lambda request: Text(reply)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "girl"})
    path = config(tmp_path, llm_server, danbooru, interpreter={"response_schema": str(tmp_path / "schema.json"),
                                                              "response_template": str(tmp_path / "caption.txt")},
                  output={"formats": ["txt", "jsonl"]})

    code, out, err = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out + err
    assert written(images) == "A girl, happy \U0001F600."
    structured = {"subject": "a girl", "mood": "happy \U0001F600"}
    assert json.loads(written(images, "a.caption.json")) == structured
    assert json.loads(written(images, "captions.jsonl"))["structured"] == structured
