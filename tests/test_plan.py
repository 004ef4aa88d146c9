"""What you configure is what runs (issue 13): the plan follows what each prompt uses, end to
end against the loopback servers, asserting on what they received and what was written."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT, make_dataset, run_caption, write_config
from fake_servers import Text, user_text

VISION = {"skip": False, "model": "vision-model", "endpoint": "vision"}


def two_servers(tmp_path, llm_server, vision_server, danbooru, **sections):
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, **sections)
    text = config.read_text()
    config.write_text(text.replace("endpoints:\n", "endpoints:\n  vision:\n    base_url: "
                                   f"{vision_server.base_url}\n    max_retries: 0\n    timeout: 10\n", 1))
    return config


def summary_requests(server):
    return [r for r in server.chat_requests if "Tag:" in user_text(r) or "wiki" in user_text(r).lower()]


def test_vision_on_means_the_description_reaches_the_caption(tmp_path, llm_server, vision_server, danbooru, capsys):
    vision_server.responder = lambda request: Text("A red square on white.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": None})
    config = two_servers(tmp_path, llm_server, vision_server, danbooru, interrogator=VISION)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    captions = [r for r in llm_server.chat_requests if "Description of the image:" in user_text(r)]
    assert len(captions) == 2 and all("A red square on white." in user_text(r) for r in captions)
    untagged = next(user_text(r) for r in captions if "cat" not in user_text(r))
    assert "Tags attached to the image:" not in untagged  # no heading with nothing under it

    code, out, _ = run_caption(["check", "--config", str(config)], capsys)
    assert "plan: tags (txt, sidecar)" in out
    assert "plan: vision: vision-model via vision → {description} in interpreter_prompt_template_short.txt" in out


def test_a_template_that_drops_the_description_stops_before_any_request(tmp_path, llm_server, vision_server,
                                                                         danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    template = "templates/interpreter_prompt_template_short_no_description.txt"
    config = two_servers(tmp_path, llm_server, vision_server, danbooru, interrogator=VISION,
                         interpreter={"prompt_template": str(ROOT / template)})
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 2 and "has no {description}" in err and "interpreter.prompt_template=auto" in err
    assert "interrogator.skip=true" in err
    assert not vision_server.chat_requests and not llm_server.chat_requests and not danbooru.requests

    code, out, _ = run_caption([str(images), "--config", str(config), "output.formats=[txt,jsonl]", "--dry-run"],
                               capsys)
    assert code == 0 and "kept in captions.jsonl" in out


def test_joycaption_alone_sends_no_tag_summaries(tmp_path, llm_server, vision_server, danbooru, capsys):
    danbooru.wiki = {"cat": "A feline."}
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = two_servers(tmp_path, llm_server, vision_server, danbooru, interrogator=VISION,
                         interpreter={"skip": True})
    code, out, err = run_caption([str(images), "--config", str(config), "--style", "descriptive"], capsys)
    assert code == 0, err
    assert not llm_server.chat_requests and not danbooru.requests
    assert len(vision_server.chat_requests) == 1 and "tags:" not in out


def test_prompts_never_carry_a_heading_with_nothing_under_it(tmp_path, llm_server, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, "http://127.0.0.1:9",
                          tag_provider={"danbooru_retries": 0})
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    prompt = user_text(llm_server.chat_requests[-1])
    assert "What some of these tags mean:" not in prompt and prompt.endswith("Tags attached to the image:\ncat")

    code, _, err = run_caption([str(images), "--config", str(config), "--style", "descriptive",
                                "output.overwrite=true", "tag_provider.source=none"], capsys)
    prompt = user_text(llm_server.chat_requests[-1])
    assert code == 0 and "vision model" not in prompt and "Description of the image" not in prompt


def test_nothing_is_captioned_from_nothing(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "highres, absurdres", "b.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          tags={"exclude": ["*res"]})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "1 captioned" in out and "nothing to caption from" in out
    assert len(llm_server.chat_requests) == 1 and "cat" in user_text(llm_server.chat_requests[0])


def test_an_empty_selection_says_why(tmp_path, llm_server, danbooru, capsys):
    train = tmp_path / "train"
    make_dataset(train, {"10_girl/a.png": "cat", "10_girl/b.png": "dog", "5_boy/c.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True})
    code, _, err = run_caption([str(train), "--config", str(config)], capsys)
    assert code == 2 and "no images in train/ itself; 3 images in 2 subfolders (kohya folders like 10_girl/): " \
                         "add recursive=true" in err
    (tmp_path / "empty").mkdir()
    code, _, err = run_caption([str(tmp_path / "empty"), "--config", str(config)], capsys)
    assert code == 2 and "no images in" in err

    code, out, _ = run_caption([str(train), "--config", str(config), "recursive=true"], capsys)
    assert code == 0 and "3 captioned" in out
    code, out, _ = run_caption([str(train), "--config", str(config), "recursive=true"], capsys)
    assert code == 0 and "nothing to do: all 3 images have captions; add output.overwrite=true" in out
    assert len(llm_server.chat_requests) == 3

    lonely = tmp_path / "lonely"
    make_dataset(lonely, {"a.png": "cat"})
    shards = [run_caption([str(lonely), "--config", str(config), "--shard", f"{k}/2"], capsys) for k in (1, 2)]
    assert [code for code, _, _ in shards] == [0, 0]
    assert any("this shard's share" in out for _, out, _ in shards)


def test_the_command_line_reads_as_people_type_it(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, images_dir="nowhere")
    code, out, _ = run_caption(["--dry-run", str(images), "--config", str(config)], capsys)
    assert code == 0 and "Dry run" in out and not llm_server.chat_requests
    code, _, err = run_caption(["--config", str(config)], capsys)
    assert code == 2 and err.startswith("usage:") and "no images folder given and images_dir" in err
    help_text = subprocess.run([sys.executable, str(ROOT / "caption.py"), "--help"], capture_output=True,
                               text=True, cwd=tmp_path).stdout
    assert "caption.py check" in help_text and "caption.py report" in help_text


def test_paths_on_the_command_line_are_relative_to_where_you_run(tmp_path, llm_server, danbooru):
    images = tmp_path / "work" / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True})
    env = {key: value for key, value in os.environ.items() if not key.endswith("_PROXY")}
    result = subprocess.run([sys.executable, str(ROOT / "caption.py"), "images", "--config", str(config),
                             "output.dir=out", "--no-progress",
                             "interpreter.prompt_template=templates/interpreter_prompt_template.txt"],
                            capture_output=True, text=True, cwd=tmp_path / "work", env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "work" / "out" / "a.txt").exists()
    assert f"Captions: <name>.txt in {tmp_path / 'work' / 'out'}" in result.stdout
    assert "several sentences" in user_text(llm_server.chat_requests[-1])  # the shipped template, found


def test_the_folder_remembers_how_it_was_captioned(tmp_path, llm_server, vision_server, danbooru, capsys):
    vision_server.responder = lambda request: Text("A red square.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "sub/b.png": "dog"})
    config = two_servers(tmp_path, llm_server, vision_server, danbooru, interrogator=VISION,
                         tag_provider={"skip": True})
    out_dir = tmp_path / "out"
    code, out, err = run_caption([str(images), "--config", str(config), "recursive=true", f"output.dir={out_dir}",
                                  "output.extension=.caption"], capsys)
    assert code == 0 and "2 captioned" in out, err
    assert (images / ".tagcaption" / "captions.jsonl").exists() and not (out_dir / ".tagcaption").exists()
    settings = json.loads((images / ".tagcaption" / "settings.json").read_text())
    assert settings["recursive"] is True and settings["output.extension"] == ".caption"

    code, out, err = run_caption(["report", str(images), "--config", str(config)], capsys)
    page = (out_dir / "captions.html").read_text()
    assert code == 0 and "sub/b.png" in page and "A red square." in page  # descriptions without jsonl
    assert "note: recursive=true, as this folder was last captioned" in err

    code, out, err = run_caption([str(images), "--config", str(config), "output.extension=.txt"], capsys)
    assert "note: output.extension=.txt given now; this folder was last captioned with output.extension=.caption" \
        in err


def test_a_sample_is_the_same_images_every_time(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(20)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption"})
    code, out, _ = run_caption([str(images), "--config", str(config), "--sample", "5", "--seed", "3"], capsys)
    first = sorted(p.name for p in images.glob("*.caption"))
    assert code == 0 and len(first) == 5
    code, out, _ = run_caption([str(images), "--config", str(config), "--sample", "5", "--seed", "3"], capsys)
    assert code == 0 and "0 captioned, 5 skipped" in out
    assert sorted(p.name for p in images.glob("*.caption")) == first
