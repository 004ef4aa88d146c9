"""Tag knowledge (issue 4): batched lookups, aliases, categories, exclusions, sidecars and
offline dumps, the wiki text a summary is made from, and an image waiting only for its own tags.

Danbooru's etiquette and faults and the tag cache are in test_tags_faults_and_cache.py, which
takes the `template` fixture and `config_for` from here. The helpers `summarising`,
`summary_requests` and `caption_prompts` are shared with it, test_tag_danbooru.py and
test_tag_dumps.py.
"""
from __future__ import annotations

import gzip
import json
import re
import threading
import time

import pytest

from conftest import make_dataset, make_image, run_caption, write_config
from fake_servers import Text, user_text
from tagcaption.dtext import wiki_text_for_summary


SUMMARY = re.compile(r'Tag: "([^"]+)"\n\nIts Danbooru wiki entry')


def summarising(request):
    asked = SUMMARY.search(user_text(request))
    if asked:
        return Text(f"Means {asked.group(1)}.")
    return Text("Caption: " + user_text(request).split("TAGS<", 1)[1].split(">", 1)[0])


def summary_requests(server):
    return [SUMMARY.search(user_text(r)).group(1) for r in server.chat_requests if SUMMARY.search(user_text(r))]


def caption_prompts(server):
    return [user_text(r) for r in server.chat_requests if not SUMMARY.search(user_text(r))]


@pytest.fixture
def template(tmp_path):
    path = tmp_path / "template.txt"
    path.write_text("TAGS<{tags}>\nGENERAL<{general_tags}>\nCHARACTER<{character_tags}>\n"
                    "COPYRIGHT<{copyright_tags}>\nARTIST<{artist_tags}>\nMETA<{meta_tags}>\nRATING<{rating}>\n"
                    "KNOWN<{tag_descriptions}>\n")
    return path


def config_for(tmp_path, llm_server, danbooru, template, **sections):
    sections.setdefault("interpreter", {})["prompt_template"] = str(template)
    return write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, **sections)


def test_distinct_tags_cost_batched_requests_and_a_rerun_costs_none(tmp_path, llm_server, danbooru, template,
                                                                     capsys):
    danbooru.wiki = {f"tag{n}": f"Tag number {n}." for n in range(150)}
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {f"{n:03}.png": ", ".join(f"tag{(n * 7 + k) % 150}" for k in range(10)) for n in range(30)})
    config = config_for(tmp_path, llm_server, danbooru, template, tag_provider={"danbooru_batch_size": 50},
                        endpoints={"default": {"concurrency": 8}})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    used = {f"tag{(n * 7 + k) % 150}" for n in range(30) for k in range(10)}
    assert sorted(danbooru.looked_up()) == sorted(used)
    tag_requests = [r for r in danbooru.requests if r.path == "/tags.json"]
    assert len(tag_requests) <= -(-len(used) // 50) + 2, len(tag_requests)
    assert not [r for r in danbooru.requests if r.path == "/tag_aliases.json"]
    assert sorted(summary_requests(llm_server)) == sorted(t.replace("_", " ") for t in used)
    assert all(r.headers["user-agent"].startswith("tagcaption/") for r in danbooru.requests)

    before = (len(danbooru.requests), len(llm_server.chat_requests))
    run_caption([str(images), "--config", str(config), "output.overwrite=true"], capsys)
    assert len(danbooru.requests) == before[0]
    assert len(summary_requests(llm_server)) == len(used)


@pytest.mark.parametrize("resolve", [True, False])
def test_aliases_deleted_pages_categories_and_exclusions(tmp_path, llm_server, danbooru, template, capsys, resolve):
    danbooru.wiki = {"cat": "A [[feline]].", "absurdres": "Very large image.", "hatsune_miku": "A vocaloid.",
                     "vocaloid": "Singing software.", "gone": "Deleted text.", "long_hair": "Long hair."}
    danbooru.deleted = {"gone"}
    danbooru.tags = {"absurdres": {"category": 5}, "hatsune_miku": {"category": 4}, "vocaloid": {"category": 3},
                     "kei_(artist)": {"category": 1, "post_count": 3}, "rare_thing": {"post_count": 2}}
    danbooru.aliases = {"kitty": "cat"}
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "kitty, absurdres, hatsune miku, vocaloid, gone, kei_(artist), rare thing, "
                                   "my_trigger, long_hair, watermark_text"})
    config = config_for(tmp_path, llm_server, danbooru, template, tags={"exclude": ["watermark*"],
                                                                        "resolve_aliases": resolve},
                        tag_provider={"min_post_count": 3})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    prompt = caption_prompts(llm_server)[0]
    shown = "cat" if resolve else "kitty"  # resolved, the alias is its target: summarised once, as itself
    assert f"TAGS<{shown}, hatsune miku, vocaloid, gone, kei (artist), my trigger, long hair>" in prompt
    assert f"GENERAL<{shown}, gone, my trigger, long hair>" in prompt
    assert "CHARACTER<hatsune miku>" in prompt and "COPYRIGHT<vocaloid>" in prompt
    assert "ARTIST<kei (artist)>" in prompt and "META<>" in prompt
    assert f"{shown}: Means {shown}." in prompt
    assert sorted(summary_requests(llm_server)) == sorted(["hatsune miku", shown, "long hair", "vocaloid"])
    summarised = next(user_text(r) for r in llm_server.chat_requests if f'Tag: "{shown}"' in user_text(r))
    assert "A feline." in summarised
    assert "watermark_text" not in danbooru.looked_up()
    assert (images / "a.tags.txt").read_text().startswith("kitty, absurdres")  # the tags file is never changed
    cache = json.loads((tmp_path / "tags_cache.json").read_text())["tags"]
    assert cache["kitty"]["alias_of"] == "cat" and cache["gone"]["summary"] is None
    assert (cache["kitty"].get("summary") is None) is resolve and ("cat" in cache) is resolve
    assert cache["absurdres"]["category"] == "meta" and cache["absurdres"]["summary"] is None
    assert cache["my_trigger"]["known"] is False


def test_gallery_dl_sidecar_gives_tags_categories_and_rating(tmp_path, llm_server, danbooru, template, capsys):
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_image(images / "danbooru_123_abcd.jpg")
    sidecar = {"id": 123, "md5": "abcd", "rating": "s", "tag_string": "1girl solo hatsune_miku vocaloid kei_(artist)",
               "tag_string_general": "1girl solo", "tag_string_character": "hatsune_miku",
               "tag_string_copyright": "vocaloid", "tag_string_artist": "kei_(artist)", "tag_string_meta": "highres",
               "tags_general": ["1girl", "solo"], "extension": "jpg", "category": "danbooru"}
    (images / "danbooru_123_abcd.jpg.json").write_text(json.dumps(sidecar, indent=4))
    make_image(images / "both.png")
    (images / "both.txt").write_text("smile, 1girl")
    (images / "both.png.json").write_text(json.dumps({"tags_general": ["blue_sky"], "rating": "g"}))
    config = config_for(tmp_path, llm_server, danbooru, template, tag_provider={"source": "none"},
                        tags={"sources": ["sidecar", "txt"], "combine": "all"})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    prompts = caption_prompts(llm_server)
    miku = next(p for p in prompts if "hatsune miku" in p)
    assert "TAGS<1girl, solo, hatsune miku, vocaloid, kei (artist)>" in miku
    assert "CHARACTER<hatsune miku>" in miku and "ARTIST<kei (artist)>" in miku and "RATING<sensitive>" in miku
    both = next(p for p in prompts if "blue sky" in p)
    assert "TAGS<blue sky, smile, 1girl>" in both and "RATING<general>" in both
    assert danbooru.requests == [] and summary_requests(llm_server) == []


def test_a_sidecar_behind_a_txt_still_gives_its_tags_categories_and_rating(tmp_path, llm_server, danbooru, template,
                                                                          capsys):
    """`combine: first` takes the tags from the `.txt` (a WD14 tagger's); the downloader's `.json`
    beside it still says which of them are characters, and the rating."""
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_image(images / "miku.png")
    (images / "miku.txt").write_text("1girl, hatsune_miku, smile")
    (images / "miku.png.json").write_text(json.dumps({"tag_string_general": "1girl smile twintails", "rating": "s",
                                                      "tag_string_character": "hatsune_miku"}))
    make_image(images / "deep.png")
    (images / "deep.txt").write_text("1girl")
    (images / "deep.png.json").write_text("[" * 100_000 + "]" * 100_000)  # costs its categories, not the image
    config = config_for(tmp_path, llm_server, danbooru, template, tag_provider={"source": "none"})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    miku = next(p for p in caption_prompts(llm_server) if "hatsune miku" in p)
    assert "TAGS<1girl, hatsune miku, smile>" in miku  # not the sidecar's twintails
    assert "CHARACTER<hatsune miku>" in miku and "RATING<sensitive>" in miku


def test_an_image_tagged_by_its_sidecar_alone_is_captioned_again_with_overwrite(tmp_path, llm_server, danbooru,
                                                                                 template, capsys):
    """Its caption takes `<stem>.txt`, where tags would be kept aside as `<stem>.tags.txt` had
    there been a tags file: there was none to keep, so none is looked for."""
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_image(images / "a.png")
    (images / "a.png.json").write_text(json.dumps({"tag_string_general": "1girl solo book"}))
    config = config_for(tmp_path, llm_server, danbooru, template, tag_provider={"source": "none"})
    assert run_caption([str(images), "--config", str(config)], capsys)[0] == 0
    code, out, _ = run_caption([str(images), "--config", str(config), "output.overwrite=true"], capsys)
    assert code == 0 and "1 captioned" in out, out
    assert not (images / "a.tags.txt").exists() and not (images / "a.txt.bak").exists()


def test_sources_first_takes_the_first_that_has_tags(tmp_path, llm_server, danbooru, template, capsys):
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_image(images / "a.png")
    (images / "a.txt").write_text("from_txt")
    (images / "a.png.json").write_text(json.dumps({"tag_string_general": "from_sidecar"}))
    config = config_for(tmp_path, llm_server, danbooru, template, tag_provider={"skip": True})
    run_caption([str(images), "--config", str(config)], capsys)
    assert "TAGS<from txt>" in caption_prompts(llm_server)[0]


@pytest.mark.parametrize("name, content", [
    ("wiki_pages.ndjson.gz", None),
    ("wiki_pages.csv", 'title,body,is_deleted\ncat,"A [[feline]], small.",false\ndog,Deleted dog.,true\n'),
    ("wiki_pages.json", json.dumps([{"title": "cat", "body": "A [[feline]], small."},
                                    {"title": "dog", "body": "Deleted dog.", "is_deleted": True}])),
])
def test_offline_wiki_dump(tmp_path, llm_server, danbooru, template, capsys, name, content):
    dump = tmp_path / name
    if content is None:
        lines = [{"id": 1, "title": "cat", "body": "A [[feline]], small.", "is_deleted": False, "other_names": []},
                 {"id": 2, "title": "dog", "body": "Deleted dog.", "is_deleted": True, "other_names": []}]
        dump.write_bytes(gzip.compress("\n".join(json.dumps(line) for line in lines).encode()))
    else:
        dump.write_text(content)
    tags_dump = tmp_path / "tags.ndjson"
    tags_dump.write_text(json.dumps({"id": 1, "name": "cat", "category": 0, "post_count": 9000}) + "\n"
                         + json.dumps({"id": 2, "name": "hatsune_miku", "category": 4, "post_count": 1}) + "\n")
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat, dog, hatsune_miku"})
    config = config_for(tmp_path, llm_server, danbooru, template,
                        tag_provider={"source": "file", "wiki_dump": name, "tags_dump": "tags.ndjson"})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert danbooru.requests == []
    assert summary_requests(llm_server) == ["cat"]
    assert "A feline, small." in user_text(llm_server.chat_requests[0])
    assert "CHARACTER<hatsune miku>" in caption_prompts(llm_server)[0]


def test_an_image_waits_only_for_its_own_tags(tmp_path, llm_server, danbooru, template, capsys):
    danbooru.wiki = {"slow": "Slow tag.", "fast": "Fast tag."}
    events = []
    lock = threading.Lock()

    def respond(request):
        text = user_text(request)
        if 'Tag: "slow"' in text:
            time.sleep(1.0)
        with lock:
            events.append(("summary slow" if 'Tag: "slow"' in text else
                           "caption fast" if "TAGS<fast>" in text else "other"))
        return summarising(request)
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "slow", "b.png": "fast"})
    config = config_for(tmp_path, llm_server, danbooru, template)
    code, _, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0
    assert events.index("caption fast") < events.index("summary slow")


def test_wiki_text_for_summary_keeps_the_meaning_only():
    body = ("A [[cat]] is a small feline.\n* [[kitten]]\n* [[tabby]]: striped coat\n"
            "h4. See also\n* [[dog]]\nh4. Appearance\nFour legs.\nh4. External links\n* \"site\":https://x.org\n")
    assert wiki_text_for_summary(body) == "A cat is a small feline.\n- tabby: striped coat\nAppearance\nFour legs."
    long = "Sentence number one is here. " * 100
    capped = wiki_text_for_summary(long, max_chars=200)
    assert len(capped) <= 200 and capped.endswith("here.")


def test_batches_stay_full_when_images_far_outnumber_workers(tmp_path, llm_server, danbooru, template, capsys):
    danbooru.wiki = {f"tag{n}": f"Tag {n}." for n in range(300)}
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {f"{n:03}.png": f"tag{n}, tag{(n + 150) % 300}" for n in range(150)})
    config = config_for(tmp_path, llm_server, danbooru, template, endpoints={"default": {"concurrency": 1}},
                        tag_provider={"danbooru_batch_size": 100, "danbooru_rate": 20})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert sorted(danbooru.looked_up()) == sorted(f"tag{n}" for n in range(300))
    # 300 tags in batches of 100: 3 full ones; a slow host may flush a few partial ones after their
    # wait, but one request per image (150) or per pair of images would be far beyond this.
    assert len([r for r in danbooru.requests if r.path == "/tags.json"]) <= 3 + 3


@pytest.mark.parametrize("name, data", [("broken.ndjson.gz", b"not gzip at all"),
                                        ("latin.csv", "title,body\ncaf\xe9,x\n".encode("latin-1")),
                                        ("missing.ndjson", None)])
def test_a_bad_wiki_dump_is_a_setup_error(tmp_path, llm_server, danbooru, template, capsys, name, data):
    if data is not None:
        (tmp_path / name).write_bytes(data)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm_server, danbooru, template,
                        tag_provider={"source": "file", "wiki_dump": name})
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 2 and "tag_provider.wiki_dump: cannot read" in err and name in err


def test_a_full_danbooru_batch_leaves_without_waiting_for_more_tags(tmp_path, llm_server, danbooru, template, capsys,
                                                                   monkeypatch):
    """Only a batch that is not full waits (BATCH_WAIT) for the tags of the next images."""
    from tagcaption import tag_provider

    monkeypatch.setattr(tag_provider, "BATCH_WAIT", 30.0)
    danbooru.wiki = {f"tag{n}": f"Tag number {n}." for n in range(8)}
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": f"tag{2 * n}, tag{2 * n + 1}" for n in range(4)})
    config = config_for(tmp_path, llm_server, danbooru, template, tag_provider={"danbooru_batch_size": 2})
    started = time.monotonic()
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert time.monotonic() - started < 15
    batches = [r.query["search[name_comma]"][0].split(",") for r in danbooru.requests if r.path == "/tags.json"]
    assert sorted(len(batch) for batch in batches) == [2, 2, 2, 2]
    assert sorted(danbooru.looked_up()) == sorted(danbooru.wiki)
