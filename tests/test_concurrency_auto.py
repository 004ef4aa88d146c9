"""`concurrency: auto` and what `check` says about a server's slots (issue 16, item 3), and
the token counts of item 4, over real HTTP against loopback servers."""
from __future__ import annotations

import asyncio
import re

import pytest

from conftest import make_dataset, run_caption, write_config
from fake_servers import FakeOpenAIServer, Text, user_text
from tagcaption.config import Config, EndpointConfig, StageConfig
from tagcaption.llm import LLM
from tagcaption.tally import Tally


def tags_only(tmp_path, server, danbooru, **endpoint):
    return write_config(tmp_path / "config.yaml", server.base_url, danbooru.url, tag_provider={"skip": True},
                        output={"extension": ".caption"}, endpoints={"default": endpoint})


def busy_server(**options) -> FakeOpenAIServer:
    return FakeOpenAIServer(models=["instruct-model"], delay=0.05, **options).start()


def test_auto_takes_llama_cpp_total_slots_and_keeps_one_request_waiting(tmp_path, danbooru, capsys):
    server = busy_server(props={"total_slots": 6, "default_generation_settings": {"n_ctx": 4096}})
    try:
        make_dataset(tmp_path / "images", {f"{n:02}.png": f"tag{n}" for n in range(40)})
        config = tags_only(tmp_path, server, danbooru, concurrency="auto")
        code, out, _ = run_caption([str(tmp_path / "images"), "--config", str(config)], capsys)
        assert code == 0 and "40 captioned" in out
        assert 6 <= server.max_in_flight <= 7  # 6 slots + 1 waiting for the next free one (not the default 4)
        assert [r.path for r in server.requests if r.method == "GET"] == ["/v1/models", "/props"]
    finally:
        server.stop()


def test_auto_without_a_slot_count_uses_the_default_and_vllm_a_high_one(tmp_path, danbooru, capsys):
    plain = busy_server()
    vllm = FakeOpenAIServer(models=["instruct-model"], delay=0.3, owned_by="vllm").start()
    try:
        make_dataset(tmp_path / "images", {f"{n:03}.png": f"tag{n}" for n in range(80)})
        code, _, _ = run_caption([str(tmp_path / "images"), "--config",
                                  str(tags_only(tmp_path, plain, danbooru, concurrency="auto"))], capsys)
        assert code == 0 and 3 <= plain.max_in_flight <= 4
        for caption in (tmp_path / "images").glob("*.caption"):
            caption.unlink()
        code, out, err = run_caption([str(tmp_path / "images"), "--config",
                                      str(tags_only(tmp_path, vllm, danbooru, concurrency="auto"))], capsys)
        assert code == 0 and 8 < vllm.max_in_flight <= 64, (out, err)  # far above the default 4
    finally:
        plain.stop()
        vllm.stop()


def test_a_number_is_kept_whatever_the_server_says(tmp_path, danbooru, capsys):
    server = busy_server(props={"total_slots": 8})
    try:
        make_dataset(tmp_path / "images", {f"{n:02}.png": f"tag{n}" for n in range(30)})
        config = tags_only(tmp_path, server, danbooru, concurrency=3)
        code, _, _ = run_caption([str(tmp_path / "images"), "--config", str(config)], capsys)
        assert code == 0 and 2 <= server.max_in_flight <= 3
        assert "/props" not in [r.path for r in server.requests]
    finally:
        server.stop()


def test_check_shows_the_slots_beside_the_concurrency_and_warns_when_some_would_idle(tmp_path, danbooru, capsys):
    server = busy_server(props={"total_slots": 8})
    plain = busy_server()
    try:
        danbooru.wiki = {"1girl": "One girl."}
        config = tags_only(tmp_path, server, danbooru, concurrency=2)
        code, out, _ = run_caption(["check", "--config", str(config)], capsys)
        assert code == 0, out  # a warning, not a failure
        assert "slots/concurrency" in out and first_row(out).split()[-1] == "8/2"
        assert ("warning: endpoints.default.concurrency is 2, but the server runs 8 requests at once: 6 of its "
                "slots would stay idle (set it to 9, or auto)") in out
        config = tags_only(tmp_path, server, danbooru, concurrency="auto")
        code, out, _ = run_caption(["check", "--config", str(config)], capsys)
        assert code == 0 and first_row(out).split()[-1] == "8/auto=9" and "would stay idle" not in out
        config = tags_only(tmp_path, plain, danbooru, concurrency=4)
        code, out, _ = run_caption(["check", "--config", str(config)], capsys)
        assert code == 0 and first_row(out).split()[-1] == "?/4"
    finally:
        server.stop()
        plain.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_image_and_cached_tokens_are_counted_where_the_server_reports_them(vision_server, stream):
    replies = [Text("A red square.", usage={"prompt_tokens_details": {"image_tokens": 256, "cached_tokens": 40}}),
               Text("A blue square.", timings={"cache_n": 30, "prompt_n": 12}),  # llama.cpp's own shape
               Text("A square.")]  # a server that reports neither
    vision_server.responder = lambda request: replies.pop(0)
    config = Config(endpoints={"default": EndpointConfig(base_url=vision_server.base_url, stream=stream)})
    tally = Tally()
    llm = LLM.from_config(config, tally=tally)

    async def ask_three():
        try:
            for _ in range(3):
                await llm.chat("interrogator", StageConfig(model="vision-model"),
                               [{"role": "user", "content": "What is it?"}])
        finally:
            await llm.close()
    asyncio.run(ask_three())
    assert tally["requests.interrogator"] == 3
    assert tally["image_tokens.interrogator"] == 256 and tally["cached_tokens.interrogator"] == 70
    assert 0 < tally["prompt_tokens.interrogator"] and 0 < tally["completion_tokens.interrogator"]


def test_a_60_tag_image_gets_the_30_rarest_summaries_by_default(tmp_path, llm_server, danbooru, capsys):
    """Post counts come from Danbooru through the tag cache; the shipped template is used."""
    tags = [f"tag_{n:02}" for n in range(60)]
    danbooru.wiki = {tag: f"The wiki page of {tag}." for tag in tags}
    danbooru.tags = {tag: {"post_count": 100 + n} for n, tag in enumerate(tags)}  # tag_00 is the rarest

    def respond(request):
        asked = re.search(r'Tag: "([^"]+)"', user_text(request))
        return Text(f"Summary of {asked.group(1)}." if asked else "A caption.")
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {"a.png": ", ".join(reversed(tags))})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          output={"extension": ".caption"})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    prompt = next(user_text(r) for r in llm_server.chat_requests if "Tags attached to the image" in user_text(r))
    lines = [line for line in prompt.splitlines() if line.startswith("tag ") and ": Summary of" in line]
    assert [line.split(":")[0] for line in lines] == [f"tag {n:02}" for n in reversed(range(30))]
    assert all(f"tag_{n:02}".replace("_", " ") in prompt for n in range(60))  # every tag is still listed


def test_auto_is_asked_again_by_every_client_built_from_the_same_config():
    server = busy_server(props={"total_slots": 6})
    try:
        config = Config(endpoints={"default": EndpointConfig(base_url=server.base_url, concurrency="auto")})

        async def limits():
            llm = LLM.from_config(config)
            try:
                await llm.endpoints["default"].list_models()
                return llm.endpoints["default"].capacity, config.endpoints["default"].concurrency
            finally:
                await llm.close()
        assert asyncio.run(limits()) == (7, 7)
        assert asyncio.run(limits()) == (7, 7)
        assert [r.path for r in server.requests].count("/props") == 2
    finally:
        server.stop()


def first_row(out: str) -> str:
    """The first row of check's table (below the plan lines and the header)."""
    lines = out.splitlines()
    return lines[next(index for index, line in enumerate(lines) if line.startswith("stage ")) + 1]
