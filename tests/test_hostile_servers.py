"""Deadlines and limits on every reply, and a server that goes away stopping the run once
(issue 14, items 2 and 5: the endpoint's part). End to end through caption.py against
loopback servers that misbehave on purpose, with short timeouts."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import time

import pytest

from conftest import make_dataset, run_caption, write_config
from fake_servers import Fault, FakeOpenAIServer, Text, user_text
from tagcaption.errors import LLMError
from tagcaption.wire import encode_body
from hostile_servers import Endless, Raw, booru, llm  # noqa: F401  (fixtures)
from test_retry import complete, llm_for

QUICK = {"max_retries": 1, "retry_backoff": 0.01, "retry_max_backoff": 0.02}


def caption_for(request) -> Text:
    return Text(f"A picture of {user_text(request).rsplit(chr(10), 1)[-1].strip()}.")


def config_for(tmp_path, server, danbooru, **endpoint):
    template = tmp_path / "template.txt"
    template.write_text("Caption this:\n{tags}\n")
    return write_config(tmp_path / "config.yaml", server.base_url, danbooru.url, tag_provider={"skip": True},
                        interpreter={"prompt_template": str(template)}, output={"extension": ".caption"},
                        endpoints={"default": {**QUICK, **endpoint}})


def failures(images):
    return {json.loads(line)["image"].rsplit("/", 1)[-1]: json.loads(line)
            for line in (images / "failures.jsonl").read_text().splitlines()}


def hostile_for(tag: str, fault: Fault):
    """`fault` for the image tagged `tag`, an ordinary caption for the others."""
    return lambda request: fault if user_text(request).endswith(tag) else caption_for(request)


def test_an_endless_stream_fails_its_image_as_a_timeout_and_the_rest_go_on(tmp_path, llm_server, danbooru,
                                                                            capsys):
    llm_server.responder = hostile_for("forever", Fault("endless", seconds=0.01))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "forever", "b.png": "cat", "c.png": "dog"})
    config = config_for(tmp_path, llm_server, danbooru, request_timeout=0.6, timeout=5)
    started = time.monotonic()
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "Traceback" not in out + err
    assert time.monotonic() - started < 6
    assert (images / "b.caption").read_text() == "A picture of cat."
    record = failures(images)["a.png"]
    assert (record["kind"], record["attempts"]) == ("timeout", 2)  # retried like any timeout
    assert "no whole reply within request_timeout (0.6 s)" in record["message"]
    assert not (images / "a.caption").exists()


def test_a_trickling_body_is_bounded_by_request_timeout_not_by_each_read(tmp_path, llm_server, danbooru, capsys):
    served = []

    def respond(request):
        served.append(1)
        return Fault("trickle", seconds=0.02) if len(served) == 1 else caption_for(request)
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm_server, danbooru, request_timeout=1.0, timeout=0.5, stream=False)
    started = time.monotonic()
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert time.monotonic() - started < 5  # the trickle alone would take about 8 s
    assert (images / "a.caption").read_text() == "A picture of cat."
    assert "interpreter:  2 requests (1 retry)" in out


def test_an_oversized_reply_is_refused_and_not_retried(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "huge", "b.png": "cat"})
    for stream in (False, True):
        llm_server.responder = hostile_for("huge", Fault("huge", size=1_200_000))
        for caption in images.glob("*.caption"):
            caption.unlink()
        before = len(llm_server.chat_requests)
        config = config_for(tmp_path, llm_server, danbooru, stream=stream)
        code, out, err = run_caption([str(images), "--config", str(config)], capsys)
        assert code == 1 and "Traceback" not in out + err
        record = failures(images)["a.png"]
        assert (record["kind"], record["attempts"]) == ("reply_too_large", 1), stream
        assert "reply refused: " in record["message"] and "more than max_reply_bytes (1,048,576" in record["message"]
        assert (images / "b.caption").read_text() == "A picture of cat."
        assert len(llm_server.chat_requests) - before == 2


def test_max_reply_bytes_is_configurable(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = hostile_for("long", Fault("huge", size=5000))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "long", "b.png": "cat"})
    config = config_for(tmp_path, llm_server, danbooru, max_reply_bytes=4096)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and failures(images)["a.png"]["kind"] == "reply_too_large"
    assert (images / "b.caption").read_text() == "A picture of cat."


def test_a_killed_server_stops_the_run_once_after_stop_after_failures(tmp_path, llm_server, danbooru, capsys):
    served = []

    def respond(request):
        served.append(1)
        if len(served) == 5:
            threading.Thread(target=llm_server.stop).start()  # killed: every new connection refused
            return Fault("drop")
        return caption_for(request)
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(60)})
    config = config_for(tmp_path, llm_server, danbooru, concurrency=2, max_retries=50, down_after=120)
    started = time.monotonic()
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert time.monotonic() - started < 10  # not down_after's 120 s
    assert code == 1 and "Traceback" not in out + err
    assert err.count("has not answered for 3 connection attempts in a row") == 1 and "stopping" in err
    assert err.count("failed: ") <= 2  # the images in flight, not one line per image left
    assert "not started" in out and "Next: start the server again" in out
    assert len(list(images.glob("*.caption"))) >= 3


def test_stop_after_failures_is_configurable_and_counts_attempts_not_requests_in_flight(tmp_path, llm_server,
                                                                                          danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(20)})
    config = write_config(tmp_path / "config.yaml", "http://127.0.0.1:9/v1", danbooru.url,
                          tag_provider={"skip": True}, output={"extension": ".caption"})
    # Nothing answers at start: that is a setup error (exit 2), before any of this counting.
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 2 and "cannot reach" in err

    served = []

    def respond(request):
        served.append(1)
        if len(served) == 1:
            threading.Thread(target=llm_server.stop).start()
        return caption_for(request)
    llm_server.responder = respond
    config = config_for(tmp_path, llm_server, danbooru, concurrency=8, max_retries=20, retry_backoff=0.05,
                        retry_max_backoff=0.05, stop_after_failures=5)
    started = time.monotonic()
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "has not answered for 5 connection attempts in a row" in err
    # Eight requests failing together count once: five counts need four waits between retries,
    # each at least half the backoff (the delay is jittered between half and all of it).
    assert time.monotonic() - started >= 4 * 0.05 * 0.5


def test_a_single_dead_replica_is_rested_while_the_other_carries_on(tmp_path, llm_server, danbooru, capsys):
    dead = FakeOpenAIServer(models=["instruct-model"]).start()
    dead_url = dead.base_url
    llm_server.responder = caption_for
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(30)})
    config = config_for(tmp_path, llm_server, danbooru, concurrency=2, max_retries=5, rest_after=1,
                        rest_seconds=60)
    config.write_text(config.read_text().replace(f"base_url: {llm_server.base_url}",
                                                 f"base_url: [{dead_url}, {llm_server.base_url}]"))
    served = []
    dead.responder = lambda request: (served.append(1), threading.Thread(target=dead.stop).start(),
                                      Fault("drop"))[-1]
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out + err
    assert "30 captioned" in out and "has not answered" not in err
    assert f"({dead_url}) failed 1 times in a row" in err and "resting it" in err


def chunk(content: str = "", finish=None) -> str:
    return json.dumps({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]})


@pytest.mark.parametrize("piece", [0, 3, 1])
def test_event_streams_in_every_servers_shape_are_read_whole(llm_server, piece):
    """CRLF lines (some proxies), comment lines (OpenRouter), an event split across reads,
    a `data:` without its space, and llama.cpp's usage after the last choice."""
    events = (f": OPENROUTER PROCESSING\r\n\r\ndata: {chunk('A ')}\r\n\r\ndata:{chunk('red square')}\n\n"
              f"data: {chunk('.', 'stop')}\n\n"
              'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 4}}\n\ndata: [DONE]\n\n')
    llm_server.responder = lambda request: Fault("raw", data=events.encode(), size=piece)
    llm, tally = llm_for(llm_server, stream=True)
    assert asyncio.run(complete(llm)) == "A red square."
    assert tally["prompt_tokens.interpreter"] == 9 and tally["completion_tokens.interpreter"] == 4


@pytest.mark.parametrize("events, kind", [
    ('event: error\ndata: {"message": "model crashed"}\n\n', "stream_error"),
    (f"data: {chunk('Half a')}\n\ndata: [DONE]\n\n", "stream_cut"),
    ("data: {not json\n\n", "malformed_reply"),
])
def test_a_stream_that_goes_wrong_is_a_retryable_fault(llm_server, events, kind):
    llm_server.responder = lambda request: Fault("raw", data=events.encode())
    llm, tally = llm_for(llm_server, stream=True)
    with pytest.raises(LLMError) as raised:
        asyncio.run(complete(llm))
    assert raised.value.record_kind == kind and raised.value.attempts == 3 == tally["requests.interpreter"]


def test_the_request_body_is_the_json_of_the_request_with_the_image_as_it_is():
    image = "data:image/jpeg;base64," + base64.b64encode(os.urandom(6000)).decode()
    quoted = 'data:image/png;base64,"' + "A" * 5000  # not spliced: it needs escaping
    for text in ("What is it?", "\x00starts with NUL", 'a "quote" and \\ and \u00e9'):
        params = {"model": "m", "messages": [
            {"role": "system", "content": text},
            {"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": image, "detail": "low"}},
                                         {"type": "image_url", "image_url": {"url": quoted}},
                                         {"type": "image_url", "image_url": {"url": image}}]}]}
        before = json.dumps(params)
        assert json.loads(encode_body(params)) == params
        assert json.dumps(params) == before  # the caller's messages are left as they were


def test_a_base_url_with_a_query_keeps_it_on_every_request(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = caption_for
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm_server, danbooru)
    config.write_text(config.read_text().replace(f"base_url: {llm_server.base_url}",
                                                 f"base_url: {llm_server.base_url}?api-version=2024-06-01"))
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and (images / "a.caption").read_text() == "A picture of cat."
    assert {(r.path, r.query["api-version"][0]) for r in llm_server.requests} == {
        ("/v1/models", "2024-06-01"), ("/v1/chat/completions", "2024-06-01")}


@pytest.mark.parametrize("body, said", [
    (b'{"error": {"code": 503, "type": "overloaded"}}', '"type": "overloaded"'),  # no message: the object
    (json.dumps({"error": {"message": "first line\nsecond " + "y" * 5000}}).encode(), "first line second yyy"),
])
def test_an_error_object_in_a_200_is_one_line_whatever_it_holds(tmp_path, llm, booru, capsys, body, said):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    llm.hostile = lambda request, headers: Raw(200, body)
    config = write_config(tmp_path / "config.yaml", llm.base_url, booru.url, tag_provider={"skip": True},
                          endpoints={"default": {"stream": False, "max_retries": 0}})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    (failure,) = [json.loads(line) for line in (images / "failures.jsonl").read_text().splitlines()]
    assert code == 1 and said in failure["message"] and "None" not in failure["message"]
    assert "\n" not in failure["message"] and len(failure["message"]) < 600


def test_a_server_that_answers_but_never_finishes_is_not_told_to_start(tmp_path, llm, booru, capsys):
    """down_after is reached by replies that time out: the hint is request_timeout, not 'start your server'."""
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": "cat" for n in range(6)})
    llm.hostile = lambda request, headers: Endless(interval=0.05)
    config = write_config(tmp_path / "config.yaml", llm.base_url, booru.url, tag_provider={"skip": True},
                          endpoints={"default": {"request_timeout": 0.5, "max_retries": 3, "retry_backoff": 0.01,
                                                 "down_after": 1, "concurrency": 1}})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "has not answered for" in err and "raise endpoints.default.request_timeout" in err
    assert "start your server" not in err
