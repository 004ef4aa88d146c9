"""The stages built by hand, as a dry run builds them: their own tag source and cache, and
counts through a Tally, over real HTTP to the fake servers."""
from __future__ import annotations

import asyncio
import base64
import io
import json
import re

import pytest
from PIL import Image

from conftest import make_image, write_config
from fake_servers import Error, Text, user_text
from tagcaption import errors
from tagcaption.config import load_config
from tagcaption.dry_run import DryRunSource
from tagcaption.interrogator import Interrogator
from tagcaption.llm import LLM
from tagcaption.tag_cache import TagCache
from tagcaption.errors import TagSummaryError
from tagcaption.tag_provider import TagProvider
from tagcaption.tally import Tally

ASKED = re.compile(r'Tag: "([^"]+)"')


def summarising(request):
    tag = ASKED.search(user_text(request)).group(1)
    return Text("I'm sorry, I can't." if tag == "touchy" else f"Means {tag}.")


async def resolve(config, tags, tally=None, **options):
    llm = LLM.from_config(config)
    provider = TagProvider(config, llm, tally or Tally(), **options)
    provider.start()
    try:
        return provider, await provider.knowledge(tags)
    finally:
        await provider.close()
        await llm.close()


def test_every_tag_outcome_counts_into_the_tally(tmp_path, llm_server, danbooru):
    danbooru.wiki = {"cat": "A feline.", "touchy": "Handle with care.", "absurdres": "Very large."}
    danbooru.tags = {"absurdres": {"category": 5}}
    llm_server.responder = summarising
    config = load_config(str(write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                                          guards={"max_attempts": 1})))
    tally = Tally()
    provider, knowledge = asyncio.run(resolve(config, ["cat", "touchy", "absurdres", "no_page"], tally=tally))
    assert knowledge["cat"].summary == "Means cat." and knowledge["touchy"].summary is None
    assert tally.group("tags") == {"found": 4, "resolved": 4, "summarised": 1, "refused": 1, "excluded": 1,
                                   "no_wiki": 1}

    tally = Tally()
    asyncio.run(resolve(config, ["cat", "touchy", "absurdres", "no_page"], tally=tally))
    assert tally.group("tags") == {"found": 4, "resolved": 4, "cached": 3, "excluded": 1}  # kept with its wiki


def test_a_summary_that_fails_twice_is_an_errors_tag_summary_error(tmp_path, llm_server, danbooru):
    danbooru.wiki = {"cat": "A feline."}
    llm_server.responder = lambda request: Error(400, {"error": {"message": "bad request"}})
    config = load_config(str(write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)))
    tally = Tally()
    with pytest.raises(errors.TagSummaryError, match="summary of tag 'cat' failed"):
        asyncio.run(resolve(config, ["cat"], tally=tally))
    assert TagSummaryError is errors.TagSummaryError
    assert tally["tags.failed"] == 2 and tally["tags.found"] == 2


def test_a_given_source_and_a_read_only_cache_leave_danbooru_and_the_cache_file_alone(tmp_path, llm_server,
                                                                                       danbooru):
    llm_server.responder = summarising
    config = load_config(str(write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)))
    cache_file = tmp_path / "tags_cache.json"
    cache_file.write_text(json.dumps({"version": 2, "tags": {"cat": {"summary": "A cached cat."}}}))
    before = cache_file.read_text()
    cache = TagCache(cache_file, read_only=True)
    provider, knowledge = asyncio.run(resolve(config, ["cat", "dog"], source=DryRunSource(), cache=cache))
    assert not danbooru.requests
    assert knowledge["cat"].summary == "A cached cat." and knowledge["dog"].summary == "Means dog."
    assert cache.read_only and cache_file.read_text() == before


def test_an_image_sent_again_smaller_counts_as_shrunk(tmp_path, vision_server, danbooru):
    def respond(request):
        url = request["messages"][0]["content"][1]["image_url"]["url"]
        if max(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size) > 600:
            return Error(400, {"error": {"code": 400, "type": "exceed_context_size_error",
                                         "message": "request exceeds the available context size"}})
        return Text("A red square.")
    vision_server.responder = respond
    image = make_image(tmp_path / "big.png", size=(1000, 800))
    config = load_config(str(write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url,
                                          interrogator={"skip": False, "max_image_size": 1000},
                                          interpreter={"skip": True})))
    tally = Tally()

    async def describe():
        llm = LLM.from_config(config)
        try:
            interrogator = Interrogator(config, llm, tally=tally)
            return interrogator, (await interrogator.descriptions(image, {}, "big.png"))[0]
        finally:
            await llm.close()
    interrogator, text = asyncio.run(describe())
    assert text == "A red square." and tally["images.shrunk"] == 1
