"""Faults (issue 3): every kind of bad reply, streamed or not, is retried and counted; a
timeout is retried and Retry-After honoured; retries that run out fail one image and are
recorded for --retry-failed; a server that goes away for good stops the run early, during
captions or tag summaries.

Crashes, locks, hand-edited captions and secrets are in test_reliability_crashes.py, which
takes its helpers (`caption_for`, `tags_only_config`, `no_partial_files`…) from here.
"""
from __future__ import annotations

import json
import random
import threading
import time

import pytest

from conftest import make_dataset, run_caption, write_config
from fake_servers import Error, Fault, Text, user_text


FAST_RETRIES = {"max_retries": 3, "retry_backoff": 0.01, "retry_max_backoff": 0.05}


def caption_for(request) -> Text:
    """The correct caption for a request: derived from the tags in its prompt."""
    tags = user_text(request).split("Tags attached to the image:\n", 1)[1].split("\n", 1)[0]
    return Text(f"A picture of {tags}.")


def faulty_once(fault, every_request=False):
    """Misbehave on the first request of each distinct prompt (or each request), then answer right."""
    seen = set()
    lock = threading.Lock()

    def respond(request):
        key = user_text(request)
        with lock:
            first = key not in seen
            seen.add(key)
        return fault if first or every_request else caption_for(request)
    return respond


def no_partial_files(folder):
    leftovers = [p for p in folder.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []


def tags_only_config(tmp_path, llm_server, danbooru, **endpoint):
    return write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                        tag_provider={"skip": True}, endpoints={"default": {**FAST_RETRIES, **endpoint}})


FAULTS = [
    (Fault("drop"), True), (Fault("drop"), False),
    (Fault("cut"), True),
    (Fault("malformed"), True), (Fault("malformed"), False),
    (Fault("empty_choices"), True), (Fault("empty_choices"), False),
    (Fault("stream_error"), True),
    (Error(500, {"error": {"code": 500, "message": "slot unavailable", "type": "server_error"}}), True),
    (Error(503, {"error": "Model is loading"}), False),
    (Error(429, {"error": {"message": "Rate limit reached", "type": "requests"}}, {"Retry-After": "0"}), True),
    (Error(408, {"object": "error", "message": "timeout", "type": "Timeout", "code": 408}), False),
    (Error(409, [{"error": {"code": 409, "message": "conflict", "status": "ABORTED"}}]), True),
]


@pytest.mark.parametrize("fault, stream", FAULTS, ids=[f"{getattr(f, 'kind', None) or f.status}-"
                                                       f"{'stream' if s else 'json'}" for f, s in FAULTS])
def test_each_fault_is_retried_and_counted(tmp_path, llm_server, danbooru, capsys, fault, stream):
    llm_server.responder = faulty_once(fault)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = tags_only_config(tmp_path, llm_server, danbooru, stream=stream)
    code, out, _ = run_caption([str(images), "--config", str(config), "output.extension=.caption"], capsys)
    assert code == 0, out
    assert (images / "a.caption").read_text() == "A picture of cat."
    assert (images / "b.caption").read_text() == "A picture of dog."
    assert "interpreter:  4 requests (2 retries)" in out
    no_partial_files(tmp_path)


def test_timeout_is_retried(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = faulty_once(Fault("hang", seconds=1.5))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = tags_only_config(tmp_path, llm_server, danbooru, timeout=0.5, stream=False)
    code, out, _ = run_caption([str(images), "--config", str(config), "output.extension=.caption"], capsys)
    assert code == 0, out
    assert (images / "a.caption").read_text() == "A picture of cat."
    assert "(1 retry)" in out


def test_retry_after_is_honoured(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = faulty_once(Error(429, {"error": {"message": "slow down"}}, {"Retry-After": "1"}))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = tags_only_config(tmp_path, llm_server, danbooru)
    started = time.monotonic()
    code, _, _ = run_caption([str(images), "--config", str(config), "output.extension=.caption"], capsys)
    assert code == 0 and time.monotonic() - started >= 1.0


def test_exhausted_retries_fail_one_image_and_are_recorded(tmp_path, llm_server, danbooru, capsys):
    def respond(request):
        if "dog" in user_text(request):
            return Error(502, "<html><body>Bad Gateway</body></html>")
        if "bird" in user_text(request):
            return Error(400, {"error": {"message": "Invalid 'messages'", "type": "invalid_request_error"}})
        return caption_for(request)
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog", "c.png": "bird"})
    config = tags_only_config(tmp_path, llm_server, danbooru)
    code, out, err = run_caption([str(images), "--config", str(config), "output.extension=.caption"], capsys)
    assert code == 1
    assert (images / "a.caption").read_text() == "A picture of cat."
    records = [json.loads(line) for line in (images / "failures.jsonl").read_text().splitlines()]
    assert {r["image"]: (r["stage"], r["kind"], r["attempts"]) for r in records} == {
        str(images / "b.png"): ("interpreter", "http_502", 4),
        str(images / "c.png"): ("interpreter", "http_400", 1)}
    assert "HTTP 502: <html><body>Bad Gateway</body></html> after 4 attempts" in out
    assert "Traceback" not in out + err

    # --retry-failed reruns only those two; the server has recovered.
    llm_server.responder = caption_for
    before = len(llm_server.chat_requests)
    code, out, _ = run_caption([str(images), "--config", str(config), "output.extension=.caption",
                                "--retry-failed"], capsys)
    assert code == 0 and "2 captioned" in out
    assert len(llm_server.chat_requests) - before == 2
    assert (images / "b.caption").read_text() == "A picture of dog."
    assert (images / "failures.jsonl").read_text() == ""


def test_mixed_faults_at_20_percent_leave_every_image_captioned(tmp_path, llm_server, danbooru, capsys):
    rng = random.Random(7)
    lock = threading.Lock()
    faults = [fault for fault, _ in FAULTS]

    def respond(request):
        with lock:
            roll = rng.random()
            fault = rng.choice(faults)
        if SUMMARY in user_text(request):
            return fault if roll < 0.2 else Text(f"Meaning of {user_text(request).split(chr(34))[1]}.")
        return fault if roll < 0.2 else caption_for(request)
    llm_server.responder = respond
    danbooru.wiki = {f"tag{n}": f"Wiki of tag {n}." for n in range(10)}
    images = tmp_path / "images"
    make_dataset(images, {f"{n:03}.png": f"tag{n % 10}, tag{(n + 3) % 10}" for n in range(300)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          endpoints={"default": {**FAST_RETRIES, "max_retries": 8, "concurrency": 8}})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out[-2000:]
    for n in range(300):
        assert (images / f"{n:03}.txt").read_text() == f"A picture of tag{n % 10}, tag{(n + 3) % 10}."
    assert "300 captioned" in out and "retries)" in out
    no_partial_files(tmp_path)


SUMMARY = "Its Danbooru wiki entry"


def test_server_down_for_good_stops_early(tmp_path, llm_server, danbooru, capsys):
    served = []

    def respond(request):
        served.append(1)
        if len(served) == 3:  # the server goes away: no new connections, open ones dropped
            threading.Thread(target=llm_server.stop).start()
        return caption_for(request) if len(served) <= 3 else Fault("drop")
    llm_server.responder = respond
    llm_server.delay = 0.05
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(30)})
    config = tags_only_config(tmp_path, llm_server, danbooru, concurrency=1, down_after=0.3, max_retries=1000)
    started = time.monotonic()
    code, out, err = run_caption([str(images), "--config", str(config), "output.extension=.caption"], capsys)
    assert code == 1
    assert time.monotonic() - started < 10
    assert "has not answered for" in err and "stopping" in err
    assert "not started" in out and "Next: start the server again, then rerun the same command" in out
    assert len(list(images.glob("*.caption"))) >= 2
    assert "Traceback" not in out + err


def test_server_gone_during_tag_summaries_stops_the_run(tmp_path, llm_server, danbooru, capsys):
    danbooru.wiki = {f"tag{n}": "A tag." for n in range(30)}

    def respond(request):
        threading.Thread(target=llm_server.stop).start()
        return Fault("drop")
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(30)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          endpoints={"default": {**FAST_RETRIES, "max_retries": 1000, "down_after": 0.3}})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "has not answered for" in err
    assert "0 failed" in out and "30 not started" in out


def test_a_failed_tag_summary_is_tried_again(tmp_path, llm_server, danbooru, capsys):
    danbooru.wiki = {"cat": "A cat."}
    failures = []

    def respond(request):
        if SUMMARY in user_text(request) and not failures:
            failures.append(1)
            return Error(503, {"error": "Model is loading"})
        if SUMMARY in user_text(request):
            return Text("A small feline.")
        return caption_for(request)
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": "cat" for n in range(12)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          endpoints={"default": {"max_retries": 0}})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "12 captioned" in out
