"""`output.variants`: several captions per image, one a line, against the loopback servers."""
from __future__ import annotations

import json
import re

from conftest import make_dataset, make_image, run_caption, write_config
from fake_servers import Text, user_text

CORRECTIVE = "repeats one already written for this image"


def by_seed(replies, corrected="A crimson feline rests on a woven rug in warm light."):
    """Answers by the request's seed; a corrective follow-up gets `corrected`."""
    def respond(request):
        if len(request["messages"]) > 1:
            return Text(corrected)
        return Text(replies[request.get("seed")])
    return respond


def config(tmp_path, server, danbooru, **sections):
    sections.setdefault("tag_provider", {"source": "none"})
    return write_config(tmp_path / "config.yaml", server.base_url, danbooru.url, **sections)


def test_three_captions_one_a_line_and_a_repeat_is_asked_again(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = by_seed({0: "A red cat sits on a mat.",
                                    1: "a red CAT sits\non a mat!",  # the first again, in other case and marks
                                    2: "Seen from above,\na small red cat naps."})
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat, red"})
    path = config(tmp_path, llm_server, danbooru, output={"variants": 3, "formats": ["txt", "jsonl", "metadata"]})

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out
    lines = ["A red cat sits on a mat.", "A crimson feline rests on a woven rug in warm light.",
             "Seen from above, a small red cat naps."]
    assert (images / "a.txt").read_text() == "\n".join(lines)
    requests = llm_server.chat_requests
    assert [request.get("seed") for request in requests] == [0, 1, 1, 2]
    follow_up = requests[2]["messages"]
    assert [message["role"] for message in follow_up] == ["user", "assistant", "user"]
    assert follow_up[1]["content"] == "a red CAT sits\non a mat!"
    assert CORRECTIVE in follow_up[2]["content"] and '"A red cat sits on a mat."' in follow_up[2]["content"]
    assert follow_up[0] == requests[0]["messages"][0], "the same prompt, asked again"
    record = json.loads((images / "captions.jsonl").read_text())
    assert record["variants"] == lines and record["caption"] == "\n".join(lines)
    assert record["guards"] == ["duplicate_variant"]
    metadata = json.loads((images / "metadata.jsonl").read_text())
    assert metadata["text"] == "\n".join(lines) and metadata["variants"] == lines
    assert "guards:   replies asked again: duplicate variant 1" in out
    assert "<name>.txt (3 captions each, one a line)" in out


def test_one_variant_is_the_caption_as_before(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Text("A red cat\non a mat.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, output={"formats": ["txt", "jsonl", "metadata"]},
                  postprocess={"collapse_whitespace": False})

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out
    (request,) = llm_server.chat_requests
    assert "seed" not in request
    assert (images / "a.txt").read_text() == "A red cat\non a mat."
    record = json.loads((images / "captions.jsonl").read_text())
    assert "variants" not in record and "structured" not in record
    assert "variants" not in json.loads((images / "metadata.jsonl").read_text())


def test_prompt_variants_are_taken_in_turn_from_the_images_pick(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Text(f"Caption with seed {request['seed']} about a cat.")
    for letter in "AB":
        (tmp_path / f"{letter}.txt").write_text(f"Template {letter}. Tags: {{tags}}")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, output={"variants": 3},
                  interpreter={"prompt_variants": [{"prompt_template": "A.txt"}, {"prompt_template": "B.txt"}],
                               "seed": 40})

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out
    asked = [re.match(r"Template (\w)", user_text(request)).group(1) for request in llm_server.chat_requests]
    assert asked[0] != asked[1] and asked[2] == asked[0], asked
    assert [request["seed"] for request in llm_server.chat_requests] == [40, 41, 42]
    one = tmp_path / "one"
    make_image(one / "a.png")
    (one / "a.txt").write_text("cat")
    run_caption([str(one), "--config", str(path), "output.variants=1"], capsys)
    assert user_text(llm_server.chat_requests[-1]).startswith(f"Template {asked[0]}"), \
        "the first caption is asked as one caption would be"


def test_a_model_that_keeps_repeating_itself_fails_the_image(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Text("A red cat sits on a mat.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, output={"variants": 2})

    code, out, err = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 1
    assert "a caption that repeats caption 1 of this image" in out + err and "after 3 attempts" in out + err
    assert (images / "a.txt").read_text() == "cat", "no caption is written, the tags are kept"
    (failure,) = [json.loads(line) for line in (images / "failures.jsonl").read_text().splitlines()]
    assert failure["kind"] == "guard_duplicate_variant" and failure["stage"] == "interpreter"
    assert len(llm_server.chat_requests) == 4


def test_a_captioning_vlm_alone_writes_its_descriptions_as_the_lines(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = by_seed({0: "A red square on white.", 1: "A plain crimson block, centred."})
    images = tmp_path / "images"
    make_image(images / "a.png")
    path = write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url,
                        interrogator={"skip": False, "prompts": ["Describe it."]}, interpreter={"skip": True},
                        output={"variants": 2}, tags_extension=None)

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out
    assert (images / "a.txt").read_text() == "A red square on white.\nA plain crimson block, centred."
    requests = vision_server.chat_requests
    assert [request["seed"] for request in requests] == [0, 1]
    assert all(part["type"] == "image_url" for request in requests for part in request["messages"][-1]["content"][1:])


def test_the_dry_run_shows_each_captions_request(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, output={"variants": 3})

    code, out, _ = run_caption([str(images), "--config", str(path), "--dry-run"], capsys)

    assert code == 0, out
    assert all(f"--- interpreter, caption {n} of 3 ---" in out for n in (1, 2, 3))
    assert out.count("(the same prompt as caption 1, with its own seed)") == 2
    assert "interpreter requests carry a seed per caption: 0, 1, 2" in out
    assert "captions: 3 per image, one a line of the caption file" in out
    assert "interpreter:  3 requests" in out
    assert llm_server.chat_requests == [] and (images / "a.txt").read_text() == "cat"


def test_a_repeat_that_fails_the_image_says_how_to_get_other_captions(tmp_path, llm_server, danbooru, capsys):
    """A server whose answers do not vary (no temperature set) repeats caption 1 however often
    it is asked: the failure line names the settings that give it room."""
    llm_server.responder = lambda request: Text("A red cat sits on a mat.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, output={"variants": 3})

    code, out, err = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 1
    hint = ("raise interpreter.temperature (to 0.8 or more), add interpreter.prompt_variants, or lower output.variants")
    (line,) = [line for line in err.splitlines() if line.startswith("failed:")]
    assert "a caption that repeats caption 1 of this image" in line and line.endswith(hint), line
    (failure,) = [json.loads(line) for line in (images / "failures.jsonl").read_text().splitlines()]
    assert failure["message"].endswith(hint)


def test_a_captioning_vlm_that_repeats_itself_is_told_of_its_own_settings(tmp_path, vision_server, danbooru,
                                                                           capsys):
    vision_server.responder = lambda request: Text("A red square on white.")
    images = tmp_path / "images"
    make_image(images / "a.png")
    path = write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url,
                        interrogator={"skip": False, "prompts": ["Describe it."]}, interpreter={"skip": True},
                        output={"variants": 2}, tags_extension=None)

    code, out, err = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 1
    assert "raise interrogator.temperature (to 0.8 or more), add interrogator.prompt_variants, or lower output.variants" \
        in err
