"""End-to-end runs of caption.py against the loopback fake servers: three stages on two
endpoints, tags-only mode and its reruns, skipped captions and kept tags files, the output
folder's layout, template values, a multi-turn conversation, bounded concurrency, the
summary's counts, and subfolders a run did not read.

Setup errors and images that fail are in test_pipeline_errors.py.
"""
from __future__ import annotations

import base64
import io
import re
import threading

from PIL import Image

from conftest import make_dataset, make_image, run_caption, write_config
from fake_servers import Text, user_text


SUMMARY_ASK = re.compile(r'Tag: "([^"]+)"\n\nIts Danbooru wiki entry')


def scripted_llm(prefix="CAPTION"):
    """Summaries name their tag; captions are unique per request and remembered by prompt."""
    counter = iter(range(10_000))
    lock = threading.Lock()

    def respond(request):
        text = user_text(request)
        asked = SUMMARY_ASK.search(text)
        if asked:
            return Text(f"Summary of {asked.group(1)}.")
        with lock:
            return Text(f"{prefix} number {next(counter)}.")
    return respond


def reply_for(server, predicate):
    matches = [reply.content for request, reply in server.exchanges if predicate(request)]
    assert len(matches) == 1, matches
    return matches[0]


def image_in(request):
    for message in request["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    return part["image_url"]["url"]
    return None


def decode_data_url(url):
    header, data = url.split(",", 1)
    return header, Image.open(io.BytesIO(base64.b64decode(data)))


def test_three_stages_two_endpoints_one_run(tmp_path, llm_server, vision_server, danbooru, capsys):
    danbooru.wiki = {"long_hair": "h4. Long hair\nHair that reaches [[the back]].",
                     "1girl": "An image with exactly one [[female]] character."}
    llm_server.responder = scripted_llm()
    vision_server.responder = lambda request: Text(f"A picture {decode_data_url(image_in(request))[1].getpixel((0, 0))}.")
    images = tmp_path / "images"
    make_image(images / "red.png", color=(250, 0, 0))
    make_image(images / "blue.jpg", color=(0, 0, 250), size=(3000, 1000))
    (images / "red.txt").write_text("1girl, long hair, smile")
    (images / "blue.txt").write_text("1girl, Long_Hair")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          endpoints={"vision": {"base_url": vision_server.base_url, "max_retries": 0}},
                          interrogator={"skip": False, "endpoint": "vision", "max_image_size": 512,
                                        "prompts": ["Describe it."]},
                          interpreter={"prompt_template": "templates/interpreter_prompt_template_short.txt"})

    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)

    assert code == 0, out
    assert "2 captioned, 0 skipped" in out and "0 failed" in out
    # Distinct tags of the whole run, each looked up and summarised once.
    assert sorted(danbooru.looked_up()) == ["1girl", "long_hair", "smile"]
    summaries = [r for r in llm_server.chat_requests if SUMMARY_ASK.search(user_text(r))]
    assert sorted(SUMMARY_ASK.search(user_text(r)).group(1) for r in summaries) == ["1girl", "long hair"]
    assert "Hair that reaches the back." in user_text(next(r for r in summaries if "long hair" in user_text(r)))
    # The vision model got each image on its own endpoint: the small PNG as it is, the big JPEG downscaled.
    assert len(vision_server.chat_requests) == 2 and all(r["model"] == "vision-model"
                                                         for r in vision_server.chat_requests)
    sent = sorted((decode_data_url(image_in(r))[1].size, image_in(r).split(",")[0])
                  for r in vision_server.chat_requests)
    assert sent == [((64, 48), "data:image/png;base64"), ((512, 171), "data:image/jpeg;base64")]
    # The interpreter saw tags, their summaries and this image's own description.
    for name, color_probe in (("red", lambda c: c[0] > 200), ("blue", lambda c: c[2] > 200)):
        description = reply_for(vision_server, lambda r: color_probe(decode_data_url(image_in(r))[1].getpixel((0, 0))))
        caption = reply_for(llm_server, lambda r: description in user_text(r))
        prompt = next(user_text(r) for r in llm_server.chat_requests if description in user_text(r))
        assert "long hair: Summary of long hair." in prompt
        assert "1girl: Summary of 1girl." in prompt
        assert (images / f"{name}.txt").read_text() == caption
    assert all(r["model"] == "instruct-model" for r in llm_server.chat_requests)


def test_tags_only_mode_and_second_run_makes_no_requests(tmp_path, llm_server, danbooru, capsys):
    danbooru.wiki = {"cat": "A [[feline|cat]].", "outdoors": "Outside."}
    llm_server.responder = scripted_llm()
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat, outdoors", "b.png": "cat", "c.png": "cat_ears"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)

    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert "3 captioned" in out and "2 summarised, 0 cached, 1 without wiki" in out
    first_requests = (len(danbooru.requests), len(llm_server.chat_requests))
    assert sorted(danbooru.looked_up()) == ["cat", "cat_ears", "outdoors"]
    assert first_requests[1] == 5
    tags_of = {"a": "cat, outdoors", "b": "cat", "c": "cat ears"}
    for name, tags in tags_of.items():
        caption = reply_for(llm_server, lambda r, t=tags: f"Tags attached to the image:\n{t}\n" in user_text(r) + "\n")
        assert (images / f"{name}.txt").read_text() == caption

    code, out, _ = run_caption([str(images), "--config", str(config), "output.overwrite=true"], capsys)
    assert code == 0 and "3 captioned" in out
    assert "0 summarised, 3 cached" in out
    assert len(danbooru.requests) == first_requests[0], "a cached tag was looked up again"
    summary_requests = [r for r in llm_server.chat_requests if SUMMARY_ASK.search(user_text(r))]
    assert len(summary_requests) == 2, "a cached tag was summarised again"
    # The rerun read tags from the kept tags files, not from the captions of the first run.
    rerun_prompts = [user_text(r) for r in llm_server.chat_requests[first_requests[1]:]]
    assert len(rerun_prompts) == 3 and not any("CAPTION" in prompt for prompt in rerun_prompts)
    for tags in tags_of.values():
        assert sum(f"Tags attached to the image:\n{tags}\n" in prompt + "\n" for prompt in rerun_prompts) == 1


def test_existing_captions_are_skipped(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    out_dir = tmp_path / "captions"
    (out_dir).mkdir()
    (out_dir / "a.txt").write_text("my hand-written caption")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          output={"dir": str(out_dir)})

    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)

    assert code == 0
    assert "1 captioned, 1 skipped" in out
    assert (out_dir / "a.txt").read_text() == "my hand-written caption"
    assert (out_dir / "b.txt").exists()
    assert all("cat" not in user_text(r) for r in llm_server.chat_requests)
    assert (images / "a.txt").read_text() == "cat" and (images / "b.txt").read_text() == "dog"


def test_output_dir_keeps_relative_layout(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images / "cloud strife", {"x.png": "1boy"})
    make_dataset(images, {"y.png": "1girl"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          recursive=True, output={"dir": "out", "extension": ".caption"})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert (tmp_path / "out" / "cloud strife" / "x.caption").is_file()
    assert (tmp_path / "out" / "y.caption").is_file()
    assert not list(images.rglob("*.caption"))


def test_tags_file_is_kept_before_caption_replaces_it(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = scripted_llm()
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "\ufeffblonde_hair,  smile ,,blonde hair\n"})
    original = (images / "a.txt").read_bytes()
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)

    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert (images / "a.tags.txt").read_bytes() == original
    first_caption = (images / "a.txt").read_text()
    assert first_caption.startswith("CAPTION")
    prompt = user_text(llm_server.chat_requests[-1])
    assert "blonde hair, smile\n" in prompt + "\n"

    # A rerun skips it; with overwrite it re-reads the kept tags, never the caption.
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert "0 captioned, 1 skipped" in out
    code, out, _ = run_caption([str(images), "--config", str(config), "output.overwrite=true"], capsys)
    assert code == 0 and "1 captioned" in out
    assert "blonde hair, smile\n" in user_text(llm_server.chat_requests[-1]) + "\n"
    assert first_caption not in user_text(llm_server.chat_requests[-1])
    assert (images / "a.tags.txt").read_bytes() == original
    assert (images / "a.txt").read_text() != first_caption


def test_crash_between_keeping_tags_and_writing_caption_is_not_a_caption(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    (images / "a.tags.txt").write_text("cat")  # as left by a run killed right after keeping the tags
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "1 captioned, 0 skipped" in out
    assert (images / "a.txt").read_text().startswith("Reply")
    assert (images / "a.tags.txt").read_text() == "cat"


def test_template_values_are_inserted_literally(tmp_path, llm_server, danbooru, capsys):
    danbooru.wiki = {"{tags}": "Braces {tags} and {0.__class__.__mro__}."}
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "{tags}, {description}, {0}, back\\slash, \"quote\", key:value"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    summary_prompt = user_text(llm_server.chat_requests[0])
    assert "Braces {tags} and {0.__class__.__mro__}." in summary_prompt
    caption_prompt = user_text(llm_server.chat_requests[-1])
    assert '{tags}, {description}, {0}, back\\slash, "quote", key:value' in caption_prompt
    assert "{tags}: Summary" not in caption_prompt and "Reply" in caption_prompt
    assert "<class" not in caption_prompt


def test_multi_turn_conversation_sends_whole_history(tmp_path, vision_server, danbooru, capsys):
    replies = iter(f"Answer {n}." for n in range(100))
    vision_server.responder = lambda request: Text(next(replies))
    images = tmp_path / "images"
    make_image(images / "cloud strife" / "pic.webp", size=(40, 40))
    (images / "cloud strife" / "metadata.json").write_text('{"series": "Final Fantasy VII"}')
    global_info = tmp_path / "characters.txt"
    global_info.write_text("Cloud Strife: spiky blond hair.")
    config = write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url, recursive=True,
                          tag_provider={"skip": True}, interpreter={"skip": True},
                          interrogator={"skip": False, "model": "vision-model", "system_prompt": "Be factual.",
                                        "global_metadata_file": "characters.txt",
                                        "hint_sources": ["full_path", "folder_metadata"],
                                        "prompts": ["Who is in {folder}?", "What are they wearing?",
                                                    "Summarise in one sentence."]})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    first, second, third = vision_server.chat_requests
    assert first["messages"][0] == {"role": "system", "content": "Be factual.\n\nCloud Strife: spiky blond hair."}
    first_user = first["messages"][1]["content"]
    assert first_user[0]["text"] == ("Who is in cloud strife?\n\nFile path: cloud strife/pic.webp\n"
                                     "Folder metadata:\nseries: Final Fantasy VII")
    assert image_in(first).startswith("data:image/jpeg;base64,")
    assert [m["role"] for m in third["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert third["messages"][2]["content"] == "Answer 0." and third["messages"][4]["content"] == "Answer 1."
    assert third["messages"][:4] == second["messages"]
    assert image_in(third) == image_in(first)
    assert (images / "cloud strife" / "pic.txt").read_text() == "Answer 2."


def test_concurrency_is_bounded_per_endpoint(tmp_path, llm_server, danbooru, capsys):
    llm_server.delay = 0.05
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(24)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          tag_provider={"skip": True}, endpoints={"default": {"concurrency": 3}})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "24 captioned" in out
    assert llm_server.max_in_flight == 3


def test_summary_reports_requests_and_tokens_per_stage(tmp_path, llm_server, danbooru, capsys):
    danbooru.wiki = {"cat": "A cat."}
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0
    usage = [r for r in llm_server.exchanges]
    assert len(usage) == 2
    assert re.search(r"tag_provider:\s+1 request, \d+ prompt \+ \d+ completion tokens", out)
    assert re.search(r"interpreter:\s+1 request, [1-9][\d,]* prompt", out)
    assert re.search(r"time:\s+\d+\.\d s", out)


def test_an_image_tagged_by_its_sidecar_alone_is_captioned_again_with_overwrite(tmp_path, llm_server, danbooru,
                                                                               capsys):
    """Its caption of ours shares no name with a tags file, which was never kept: it is replaced."""
    llm_server.responder = scripted_llm()
    images = tmp_path / "images"
    make_image(images / "a.png")
    (images / "a.json").write_text('{"tag_string_general": "cat smile", "rating": "g"}')
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"source": "none"})

    assert run_caption([str(images), "--config", str(config)], capsys)[0] == 0
    first = (images / "a.txt").read_text()
    code, out, _ = run_caption([str(images), "--config", str(config), "output.overwrite=true"], capsys)

    assert code == 0, out
    assert (images / "a.txt").read_text() != first and not (images / "a.tags.txt").exists()
    assert not list(images.glob("a.txt.bak*")), "a caption of ours is replaced without a backup"


def test_subfolders_a_run_did_not_read_are_named_once(tmp_path, llm_server, danbooru, capsys):
    """A folder with images of its own and a kohya subfolder: the run captions the top and says
    what it left; with recursive=true, nothing is left and nothing is said."""
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "10_miku/b.png": "cat", "deep/c.png": "cat"})
    (images / "empty").mkdir()
    llm_server.responder = lambda request: Text("A cat.")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"dir": str(images / "out")})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "1 captioned" in out
    assert err.count("note: 2 subfolders of images hold images this run did not read (10_miku/, deep/); "
                     "add recursive=true") == 1
    code, out, err = run_caption([str(images), "--config", str(config), "recursive=true"], capsys)
    assert code == 0 and "2 captioned" in out and "did not read" not in err
