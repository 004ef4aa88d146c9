"""Tag knowledge from Danbooru as it is in 2026 (issue 17, points 2–4): implications asked in
batches and pruned from prompts, names, a Cloudflare challenge or refusal recognised at the
first request, a Danbooru that never answers given up once and remembered, the User-Agent."""
from __future__ import annotations

import json
import time

import pytest

from conftest import make_dataset, run_caption, write_config
from fake_servers import CHALLENGE, Text, user_text
from tagcaption.version import VERSION
from test_tags import caption_prompts, summarising, summary_requests


@pytest.fixture
def template(tmp_path):
    path = tmp_path / "template.txt"
    path.write_text("TAGS<{tags}>\nBOORU<{booru_tags}>\nCOPYRIGHT<{copyright_tags}>\nCHARACTERS<{character_names}>\n"
                    "SERIES<{copyright_names}>\nARTISTS<{artist_names}>\nKNOWN<{tag_descriptions}>\n")
    return path


def config_for(tmp_path, llm_server, danbooru, template, **sections):
    sections.setdefault("interpreter", {})["prompt_template"] = str(template)
    return write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, **sections)


def prompt_with(server, text: str) -> str:
    return next(prompt for prompt in caption_prompts(server) if text in prompt)


def hair_danbooru(danbooru):
    danbooru.wiki = {"long_hair": "Hair below the shoulders.", "very_long_hair": "Hair past the waist.",
                     "smile": "Smiling.", "kaga_(kantai_collection)": "A carrier.", "kantai_collection": "A game.",
                     "wlop": "A painter.", "hatsune_miku": "A singer."}
    danbooru.tags = {"absurdly_long_hair": {}, "kaga_(kantai_collection)": {"category": 4},
                     "kantai_collection": {"category": 3}, "wlop": {"category": 1}, "hatsune_miku": {"category": 4}}
    danbooru.implications = {"absurdly_long_hair": ["very_long_hair"], "very_long_hair": ["long_hair"],
                             "kaga_(kantai_collection)": ["kantai_collection"]}
    danbooru.other_names = {"wlop": ["WLOP", "王凌"], "kaga_(kantai_collection)": ["加賀", "Kaga"]}


def test_implied_tags_are_pruned_from_prompts_and_asked_in_batches(tmp_path, llm_server, danbooru, template, capsys):
    hair_danbooru(danbooru)
    llm_server.responder = summarising
    images = tmp_path / "images"
    own = "absurdly_long_hair, long_hair, smile, kaga_(kantai_collection), kantai_collection, wlop"
    make_dataset(images, {"a.png": own, "b.png": "long_hair, smile", "c.png": "hatsune_miku"})
    config = config_for(tmp_path, llm_server, danbooru, template)
    args = [str(images), "--config", str(config), "output.overwrite=true"]
    code, out, _ = run_caption(args, capsys)
    assert code == 0, out
    a = prompt_with(llm_server, "absurdly")
    assert "TAGS<absurdly long hair, smile, kaga (kantai collection), kantai collection, wlop>" in a
    assert f"BOORU<{own}>" in a and "long hair:" not in a  # the image's own tags, and its tags file, stay whole
    assert "COPYRIGHT<kantai collection>" in a and "SERIES<Kantai Collection>" in a  # a series a character implies
    assert "CHARACTERS<Kaga (Kantai Collection)>" in a and "ARTISTS<WLOP>" in a
    assert "TAGS<long hair, smile>" in prompt_with(llm_server, "BOORU<long_hair, smile>")
    assert "CHARACTERS<Hatsune Miku>" in prompt_with(llm_server, "hatsune")
    implications = danbooru.asked("/tag_implications.json")
    assert len(implications) == 2  # the run's tags in one batch, then their parents' parents
    assert "hatsune_miku" not in sum(implications, [])  # alone on its image: it cannot prune anything
    assert sorted(implications[1]) == ["very_long_hair"]
    cache = json.loads((tmp_path / "tags_cache.json").read_text())["tags"]
    assert cache["absurdly_long_hair"]["implies"] == ["long_hair", "very_long_hair"]
    assert cache["wlop"]["spelling"] == "WLOP" and cache["smile"]["source"] == {"from": "danbooru",
                                                                              "url": danbooru.url}

    before = len(danbooru.requests)
    code, _, _ = run_caption(args, capsys)
    assert code == 0 and len(danbooru.requests) == before  # everything, implications too, from the cache
    assert any("TAGS<absurdly long hair, smile," in prompt for prompt in caption_prompts(llm_server)[-3:])


def test_prune_implied_off_asks_no_implications(tmp_path, llm_server, danbooru, template, capsys):
    hair_danbooru(danbooru)
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "very_long_hair, long_hair"})
    config = config_for(tmp_path, llm_server, danbooru, template, tags={"prune_implied": False})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert "TAGS<very long hair, long hair>" in caption_prompts(llm_server)[0]
    assert danbooru.asked("/tag_implications.json") == []


def test_a_cache_from_before_implications_asks_only_for_them(tmp_path, llm_server, danbooru, template, capsys):
    hair_danbooru(danbooru)
    llm_server.responder = summarising
    entries = {name: {"summary": f"Cached {name}.", "category": "general", "known": True, "checked": time.time()}
               for name in ("very_long_hair", "long_hair")}
    (tmp_path / "tags_cache.json").write_text(json.dumps({"version": 2, "tags": entries}))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "very_long_hair, long_hair"})
    code, out, _ = run_caption([str(images), "--config", str(config_for(tmp_path, llm_server, danbooru, template))],
                               capsys)
    assert code == 0 and "2 cached" in out, out
    assert danbooru.looked_up() == [] and summary_requests(llm_server) == []
    assert danbooru.asked("/tag_implications.json") == [["very_long_hair", "long_hair"]]  # one batch, no parent left
    assert "TAGS<very long hair>" in caption_prompts(llm_server)[0]
    assert json.loads((tmp_path / "tags_cache.json").read_text())["tags"]["long_hair"]["implies"] == []


@pytest.mark.parametrize("override, said", [
    (lambda path: CHALLENGE, "answered with a Cloudflare challenge (HTTP 403, cf-mitigated: challenge)"),
    (lambda path: (200, "<html><body>Down for maintenance</body></html>", "text/html"),
     "answered HTTP 200 with an HTML page instead of its API"),
    (lambda path: (401, {"success": False, "message": "SessionLoader::AuthenticationFailure"}, "application/json"),
     "refused the login (HTTP 401)"),
])
def test_a_challenge_is_recognised_at_the_first_request_and_danbooru_is_not_asked_again(
        tmp_path, llm_server, danbooru, template, capsys, override, said):
    danbooru.wiki = {f"tag{n}": f"Tag {n}." for n in range(6)}
    danbooru.override = override
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": f"tag{n}" for n in range(6)})
    config = config_for(tmp_path, llm_server, danbooru, template,
                        tag_provider={"danbooru_batch_size": 1, "danbooru_concurrency": 1})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "6 captioned" in out, out + err
    assert len(danbooru.requests) == 1
    assert err.count(said) == 1 and err.count("warning:") == 1, err
    if "401" not in said:
        assert "tag_provider.login and tag_provider.api_key" in err and "tag_provider.source: none" in err
    assert f"danbooru: Danbooru at {danbooru.url} {said.split(' (HTTP')[0]}" in out
    assert "6 tags went without knowledge; captions were made with tags only" in out
    assert "6 not looked up" in out and "Traceback" not in err


def test_with_a_login_the_user_agent_names_the_account(tmp_path, llm_server, danbooru, template, capsys):
    danbooru.wiki = {"cat": "A cat."}
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm_server, danbooru, template, tag_provider={"login": "alice", "api_key": "k3y-1"})
    assert run_caption([str(images), "--config", str(config)], capsys)[0] == 0
    assert {r.headers["user-agent"] for r in danbooru.requests} == {f"tagcaption/{VERSION} (by alice)"}


def silent_config(tmp_path, llm_server, danbooru, template, **tag_provider):
    return config_for(tmp_path, llm_server, danbooru, template, tag_provider={
        "danbooru_timeout": 0.3, "danbooru_retries": 1, "danbooru_batch_size": 1, "danbooru_concurrency": 1,
        **tag_provider})


def test_a_danbooru_that_never_answers_costs_one_lookup_and_is_remembered(tmp_path, llm_server, danbooru,
                                                                         template, capsys):
    danbooru.silent = True
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": f"tag{n}, other{n}" for n in range(5)})
    config = silent_config(tmp_path, llm_server, danbooru, template)
    args = [str(images), "--config", str(config), "output.overwrite=true"]
    started = time.monotonic()
    code, out, err = run_caption(args, capsys)
    assert code == 0 and "5 captioned" in out, out + err
    assert time.monotonic() - started < 5  # two attempts of 0.3 s and one backoff, not ten batches of them
    assert len(danbooru.requests) == 2
    assert err.count("did not answer within 0.3 s") == 1
    assert f"danbooru: Danbooru at {danbooru.url} did not answer (2 attempts); not asked again for 10 min; " \
           "10 tags went without knowledge" in out
    outage = json.loads((tmp_path / "tags_cache.json").read_text())["outages"][danbooru.url]
    assert outage["until"] - outage["since"] == pytest.approx(600)

    started = time.monotonic()
    code, out, err = run_caption(args, capsys)
    assert code == 0 and len(danbooru.requests) == 2 and time.monotonic() - started < 3
    assert "did not answer (2 attempts) at" in err and "--refresh-tags asks anyway" in err
    assert "not asked until" in out and "10 tags went without knowledge" in out

    code, out, _ = run_caption(args + ["--refresh-tags"], capsys)
    assert len(danbooru.requests) == 4  # asked anyway, and given up again


def test_an_outage_is_not_remembered_with_outage_minutes_0(tmp_path, llm_server, danbooru, template, capsys):
    danbooru.silent = True
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = silent_config(tmp_path, llm_server, danbooru, template, outage_minutes=0)
    args = [str(images), "--config", str(config), "output.overwrite=true"]
    assert run_caption(args, capsys)[0] == 0 and run_caption(args, capsys)[0] == 0
    assert len(danbooru.requests) == 4
    cache = tmp_path / "tags_cache.json"
    assert not cache.exists() or "outages" not in json.loads(cache.read_text())


def test_the_shipped_templates_name_characters_series_and_artists(tmp_path, llm_server, danbooru, capsys):
    hair_danbooru(danbooru)
    llm_server.responder = lambda request: Text("Means it." if 'Tag: "' in user_text(request) else
                                                "Kaga of Kantai Collection smiles.")  # faithful: names both
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "kaga_(kantai_collection), kantai_collection, wlop, smile"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    prompt = next(user_text(r) for r in llm_server.chat_requests if "Named in the tags" in user_text(r))
    assert "Characters: Kaga (Kantai Collection)\nSeries: Kantai Collection\nArtists: WLOP\n" in prompt


def test_tags_and_description_keeps_the_images_own_tags(tmp_path, llm_server, danbooru, capsys):
    hair_danbooru(danbooru)
    danbooru.aliases = {"kitty": "smile"}
    llm_server.responder = lambda request: Text("Means it." if 'Tag: "' in user_text(request) else "A description.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "very_long_hair, long_hair, kitty"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          interpreter={"style": "tags_and_description"})
    assert run_caption([str(images), "--config", str(config)], capsys)[0] == 0
    assert (images / "a.txt").read_text() == "very_long_hair, long_hair, kitty, A description."
    prompt = next(user_text(r) for r in llm_server.chat_requests if "very long hair" in user_text(r)
                  and 'Tag: "' not in user_text(r))
    assert "long hair," not in prompt.replace("very long hair", "") and "smile" in prompt


def test_a_negative_outage_time_is_refused(tmp_path, llm_server, danbooru, template, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm_server, danbooru, template, tag_provider={"outage_minutes": -1})
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 2 and "tag_provider.outage_minutes must be at least 0" in err
