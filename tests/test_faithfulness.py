"""Captions a trainer can trust (issue 19): the faithfulness check end to end, against a loopback
OpenAI-compatible server whose replies drop a name, forget the trigger word, contradict an eye
colour or the people count, or mention an omitted trait."""
from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import List

import pytest

from conftest import make_image, run_caption, write_config
from fake_servers import Text, user_text
from test_ux import chromium, rendered

MIKU = {"tag_string_general": "1girl solo red_eyes smile", "tag_string_character": "hatsune_miku", "rating": "g"}


def sidecar_images(folder: Path, **images: dict) -> Path:
    """Images with gallery-dl sidecars (`<name>.json`), which give the tags their categories."""
    for name, sidecar in images.items():
        make_image(folder / name)
        (folder / f"{name}.json").write_text(json.dumps(sidecar), encoding="utf-8")
    return folder


def scripted(*replies: str):
    """Answers the caption requests in order; the last reply repeats."""
    lock, asked = threading.Lock(), []

    def respond(request):
        with lock:
            asked.append(request)
            return Text(replies[min(len(asked), len(replies)) - 1])
    return respond


def config_for(tmp_path: Path, llm_server, danbooru, **sections) -> Path:
    sections.setdefault("tag_provider", {"skip": True})
    return write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, **sections)


def records(images: Path) -> List[dict]:
    return [json.loads(line) for line in (images / "captions.jsonl").read_text().splitlines()]


def test_a_reply_that_drops_the_name_gets_a_corrective_turn_naming_it(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = scripted("A girl with red eyes smiles.", "Hatsune Miku, with red eyes, smiles.")
    images = sidecar_images(tmp_path / "images", **{"a.png": MIKU})
    config = config_for(tmp_path, llm_server, danbooru, output={"formats": ["txt", "jsonl"]})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    first, second = llm_server.chat_requests
    assert "Characters: Hatsune Miku" in user_text(first)
    assert second["messages"][:-2] == first["messages"]
    assert second["messages"][-2] == {"role": "assistant", "content": "A girl with red eyes smiles."}
    assert second["messages"][-1] == {"role": "user", "content": "The caption must name Hatsune Miku. Write the "
                                      "caption again with this fixed, and answer with the caption only."}
    assert (images / "a.txt").read_text() == "Hatsune Miku, with red eyes, smiles."
    assert "replies asked again: faithfulness 1" in out
    (record,) = records(images)
    assert record["guards"] == ["faithfulness"] and record["corrected"] == ["does not name Hatsune Miku"]
    assert "flags" not in record


def test_names_known_from_danbooru_categories_and_a_fresh_retry_carries_the_requirement(tmp_path, llm_server,
                                                                                        danbooru, capsys):
    danbooru.tags = {"kaga_(kantai_collection)": {"category": 4}, "kantai_collection": {"category": 3}}
    danbooru.wiki = {"kaga_(kantai_collection)": "An aircraft carrier.", "kantai_collection": "A game."}

    def respond(request):
        text = user_text(request)
        if 'Tag: "' in text:
            return Text("A summary.")
        return Text("Kaga of Kantai Collection." if "The caption must name Kaga" in text else "An archer.")
    llm_server.responder = respond
    images = tmp_path / "images"
    make_image(images / "a.png")
    (images / "a.txt").write_text("kaga_(kantai_collection), kantai_collection, 1girl, solo", encoding="utf-8")
    config = config_for(tmp_path, llm_server, danbooru, tag_provider={"skip": False},
                        guards={"retry_mode": "fresh"}, output={"extension": ".caption"})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    captions = [r for r in llm_server.chat_requests if 'Tag: "' not in user_text(r)]
    first, second = captions
    assert len(second["messages"]) == len(first["messages"])  # a fresh request, not a follow-up turn
    assert second["messages"][-1]["content"] == first["messages"][-1]["content"] + \
        "\n\nThe caption must name Kaga (Kantai Collection). The caption must name Kantai Collection."
    assert (images / "a.caption").read_text() == "Kaga of Kantai Collection."


def test_a_forgotten_trigger_word_is_asked_for_and_a_prefix_keeps_it_by_construction(tmp_path, llm_server,
                                                                                     danbooru, capsys):
    llm_server.responder = scripted("A girl reads a book.", "Aria reads a book.")
    images = sidecar_images(tmp_path / "images", **{"a.png": {"tag_string_general": "1girl solo book"}})
    style = {"name": "Aria", "extra_options": ["name"]}
    config = config_for(tmp_path, llm_server, danbooru, interpreter={"style": "descriptive"}, style=style)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert "you must refer to them as Aria" in user_text(llm_server.chat_requests[0])
    assert llm_server.chat_requests[1]["messages"][-1]["content"].startswith("The caption must name Aria.")
    assert (images / "a.txt").read_text() == "Aria reads a book."

    llm_server.responder = scripted("A girl reads a book.")
    asked = len(llm_server.chat_requests)
    code, out, _ = run_caption([str(images), "--config", str(config), "output.overwrite=true",
                                "postprocess.prefix='Aria, '"], capsys)
    assert code == 0 and len(llm_server.chat_requests) - asked == 1, out
    assert (images / "a.txt").read_text() == "Aria, A girl reads a book."


def test_an_eye_colour_the_tags_contradict_is_corrected(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = scripted("A girl with blue eyes smiles.", "A girl with red eyes smiles.")
    images = sidecar_images(tmp_path / "images", **{"a.png": {"tag_string_general": "1girl solo red_eyes smile"}})
    code, out, _ = run_caption([str(images), "--config", str(config_for(tmp_path, llm_server, danbooru))], capsys)
    assert code == 0, out
    assert llm_server.chat_requests[1]["messages"][-1]["content"].startswith(
        "The tags say red eyes; the caption says blue eyes.")
    assert (images / "a.txt").read_text() == "A girl with red eyes smiles."


@pytest.mark.parametrize("tags, bad, said", [
    ("1girl solo", "Two girls share an umbrella.", "The tags say 1girl, solo; the caption says two girls."),
    ("2girls", "A girl stands alone under an umbrella.",
     "The tags say 2girls; the caption says girl stands alone."),
])
def test_a_people_count_the_tags_contradict_is_corrected(tmp_path, llm_server, danbooru, capsys, tags, bad, said):
    llm_server.responder = scripted(bad, "Under an umbrella in the rain.")
    images = sidecar_images(tmp_path / "images", **{"a.png": {"tag_string_general": f"{tags} umbrella rain"}})
    code, out, _ = run_caption([str(images), "--config", str(config_for(tmp_path, llm_server, danbooru))], capsys)
    assert code == 0, out
    assert llm_server.chat_requests[1]["messages"][-1]["content"].startswith(said)


def test_omitted_traits_leave_the_prompt_and_a_caption_that_mentions_one_is_corrected(tmp_path, llm_server,
                                                                                      danbooru, capsys):
    llm_server.responder = scripted("Miku with blue hair and twintails smiles.", "Miku smiles.")
    sidecar = {"tag_string_general": "1girl solo blue_hair twintails smile", "tag_string_character": "hatsune_miku"}
    images = sidecar_images(tmp_path / "images", **{"a.png": sidecar})
    config = config_for(tmp_path, llm_server, danbooru, style={"omit_traits_of": ["blue_hair", "twintails"]},
                        output={"formats": ["txt", "jsonl"]})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    prompt = user_text(llm_server.chat_requests[0])
    assert "Tags attached to the image:\n1girl, solo, smile, hatsune miku\n" in prompt
    assert "Do not mention these traits at all (the trained name stands for them):\nblue hair, twintails" in prompt
    assert llm_server.chat_requests[1]["messages"][-1]["content"].startswith(
        "Do not mention blue hair. Do not mention twintails.")
    assert (images / "a.txt").read_text() == "Miku smiles."
    assert records(images)[0]["tags"] == "1girl, solo, smile, hatsune miku"


def test_without_omitted_traits_the_prompt_has_no_such_line(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = scripted("Miku smiles.")
    images = sidecar_images(tmp_path / "images", **{"a.png": MIKU})
    assert run_caption([str(images), "--config", str(config_for(tmp_path, llm_server, danbooru))], capsys)[0] == 0
    assert "Do not mention" not in user_text(llm_server.chat_requests[0])


def test_warn_keeps_the_caption_and_records_the_findings_for_review(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = scripted("A girl with blue eyes smiles.")
    images = sidecar_images(tmp_path / "images", **{"a.png": {"tag_string_general": "1girl solo"}, "b.png": MIKU})
    config = config_for(tmp_path, llm_server, danbooru, guards={"faithfulness": "warn"},
                        output={"formats": ["txt", "jsonl"], "report": True})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert len(llm_server.chat_requests) == 2  # nothing asked again
    assert (images / "b.txt").read_text() == "A girl with blue eyes smiles."
    flagged = {record["file"]: record.get("flags") for record in records(images)}
    assert flagged == {"a.png": None,
                       "b.png": ["does not name Hatsune Miku", "says blue eyes where the tags say red eyes"]}
    assert "flagged:  1 caption kept with faithfulness findings: see `flags` in their records" in out
    assert "warning: b.png: caption kept with faithfulness findings: does not name Hatsune Miku; says blue eyes" in err
    page = images / "captions.html"
    text = page.read_text()
    assert 'class="card captioned flagged" data-kind="captioned flagged"' in text
    assert "<li>does not name Hatsune Miku</li>" in text
    assert text.index(">b.png<") < text.index(">a.png<")  # flagged captions first
    if chromium():
        assert "1 of 2 images" in rendered(page, "#filter=flagged")


def test_after_max_attempts_the_image_fails_with_one_line_that_names_the_fix(tmp_path, llm_server, danbooru,
                                                                            capsys):
    llm_server.responder = scripted("A girl with red eyes smiles.")
    images = sidecar_images(tmp_path / "images", **{"a.png": MIKU})
    config = config_for(tmp_path, llm_server, danbooru, guards={"max_attempts": 2}, output={"report": True})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and len(llm_server.chat_requests) == 2
    assert not (images / "a.txt").exists()
    failure = json.loads((images / "failures.jsonl").read_text())
    assert failure["kind"] == "guard_faithfulness" and failure["attempts"] == 2
    assert "\n" not in failure["message"]
    assert failure["message"].endswith("model 'instruct-model': caption not faithful to the tags: does not name "
                                       "Hatsune Miku (after 2 attempts); to keep such captions and flag them for "
                                       "review instead, set guards.faithfulness: warn")
    line = next(line for line in out.splitlines() if "a.png:" in line)
    assert "does not name Hatsune Miku" in line and "guards.faithfulness: warn" in line
    assert 'data-kind="failed flagged"' in (images / "captions.html").read_text()


def test_a_vision_model_alone_is_held_only_to_tags_its_prompt_carried(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = scripted("Two girls with blue eyes.")
    images = sidecar_images(tmp_path / "images", **{"a.png": MIKU})
    config = write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url, tag_provider={"skip": True},
                          interrogator={"skip": False}, interpreter={"skip": True})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and len(vision_server.chat_requests) == 1, out
    assert (images / "a.txt").read_text() == "Two girls with blue eyes."

    vision_server.responder = scripted("Two girls with blue eyes.", "Miku with red eyes.")
    config = write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url, tag_provider={"skip": True},
                          interrogator={"skip": False, "prompts": ["Caption this image. Its tags: {tags}"]},
                          interpreter={"skip": True}, output={"overwrite": True})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert vision_server.chat_requests[-1]["messages"][-1]["content"] == (
        "The caption must name Hatsune Miku. The tags say red eyes; the caption says blue eyes. The tags say 1girl, "
        "solo; the caption says two girls. Write the caption again with this fixed, and answer with the caption only.")
    assert (images / "a.txt").read_text() == "Miku with red eyes."


def test_off_checks_nothing_even_written_bare_as_yaml_reads_it(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = scripted("Two girls with blue eyes.")
    images = sidecar_images(tmp_path / "images", **{"a.png": MIKU})
    config = config_for(tmp_path, llm_server, danbooru)
    config.write_text(config.read_text() + "guards:\n  faithfulness: off\n", encoding="utf-8")
    assert run_caption([str(images), "--config", str(config)], capsys)[0] == 0
    assert len(llm_server.chat_requests) == 1
    code, _, _ = run_caption([str(images), "--config", str(config_for(tmp_path, llm_server, danbooru)),
                              "guards.faithfulness=off", "output.overwrite=true"], capsys)
    assert code == 0 and len(llm_server.chat_requests) == 2


def test_check_reports_a_table_of_opposites_it_cannot_read(tmp_path, llm_server, danbooru, capsys):
    config = config_for(tmp_path, llm_server, danbooru, guards={"contradictions": "missing.txt"})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2 and "guards.contradictions" in out + err


def test_a_table_of_opposites_of_ones_own(tmp_path, llm_server, danbooru, capsys):
    (tmp_path / "opposites.txt").write_text("cat: dog, puppy\n", encoding="utf-8")
    llm_server.responder = scripted("A puppy on a mat.", "A cat on a mat.")
    images = sidecar_images(tmp_path / "images", **{"a.png": {"tag_string_general": "cat mat"}})
    config = config_for(tmp_path, llm_server, danbooru, guards={"contradictions": "opposites.txt"})
    assert run_caption([str(images), "--config", str(config)], capsys)[0] == 0
    assert llm_server.chat_requests[1]["messages"][-1]["content"].startswith(
        "The tags say cat; the caption says puppy.")


@pytest.mark.parametrize("override, message", [
    ("guards.faithfulness=sometimes", "guards.faithfulness must be retry, warn or off (got 'sometimes')"),
    ("style.omit_traits_of=['*_hair']", "style.omit_traits_of: '*_hair' is not a tag"),
    ("guards.contradictions=missing.txt", "guards.contradictions"),
])
def test_bad_settings_are_one_line_before_any_request(tmp_path, llm_server, danbooru, capsys, override, message):
    images = sidecar_images(tmp_path / "images", **{"a.png": MIKU})
    code, _, err = run_caption([str(images), "--config", str(config_for(tmp_path, llm_server, danbooru)), override],
                               capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not llm_server.chat_requests


def test_every_variant_and_every_structured_caption_is_held_to_the_tags(tmp_path, llm_server, danbooru, capsys):
    """With output.variants the second caption is checked like the first; with a response
    schema the text written from the object is."""
    llm_server.responder = scripted("Hatsune Miku smiles, red eyes.", "A smiling girl with red eyes.",
                                    "Hatsune Miku, red-eyed, smiles at the viewer.")
    images = sidecar_images(tmp_path / "images", **{"a.png": MIKU})
    config = config_for(tmp_path, llm_server, danbooru, output={"variants": 2, "formats": ["txt", "jsonl"]})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    first, second, third = llm_server.chat_requests
    assert third["messages"][-1]["content"].startswith("The caption must name Hatsune Miku.")
    assert (images / "a.txt").read_text().splitlines() == ["Hatsune Miku smiles, red eyes.",
                                                          "Hatsune Miku, red-eyed, smiles at the viewer."]
    (record,) = records(images)
    assert record["guards"] == ["faithfulness"] and len(record["variants"]) == 2

    structured = sidecar_images(tmp_path / "structured", **{"b.png": MIKU})
    (tmp_path / "schema.json").write_text(json.dumps({
        "type": "object", "required": ["subject"], "additionalProperties": False,
        "properties": {"subject": {"type": "string"}}}))
    (tmp_path / "caption.txt").write_text("{subject}")
    llm_server.responder = scripted('{"subject": "a girl with blue eyes"}', '{"subject": "Hatsune Miku, red eyes"}')
    config = config_for(tmp_path, llm_server, danbooru, interpreter={
        "response_schema": str(tmp_path / "schema.json"), "response_template": str(tmp_path / "caption.txt")})
    code, out, _ = run_caption([str(structured), "--config", str(config)], capsys)
    assert code == 0, out
    follow_up = llm_server.chat_requests[-1]["messages"][-1]["content"]
    assert "Hatsune Miku" in follow_up and "red eyes" in follow_up
    assert json.loads((structured / "b.caption.json").read_text()) == {"subject": "Hatsune Miku, red eyes"}


def test_a_dry_run_says_what_captions_are_held_to(tmp_path, llm_server, danbooru, capsys):
    images = sidecar_images(tmp_path / "images", **{"a.png": MIKU})
    config = config_for(tmp_path, llm_server, danbooru, style={"omit_traits_of": ["twintails"]})
    code, out, _ = run_caption([str(images), "--config", str(config), "--dry-run"], capsys)
    assert code == 0 and "plan: held to the tags (guards.faithfulness: retry): names of character and series " \
                         "tags" in out and "never twintails" in out
    code, out, _ = run_caption([str(images), "--config", str(config), "--dry-run", "guards.faithfulness=off"], capsys)
    assert code == 0 and "held to the tags" not in out and not llm_server.chat_requests


def test_warn_keeps_the_findings_of_every_variant_and_a_clean_one_erases_none(tmp_path, llm_server, danbooru,
                                                                               capsys):
    llm_server.responder = scripted("Hatsune Miku with blue eyes smiles.", "Hatsune Miku smiles, red eyes.",
                                    "Hatsune Miku, red-eyed, waves at the viewer.")
    images = sidecar_images(tmp_path / "images", **{"a.png": MIKU})
    config = config_for(tmp_path, llm_server, danbooru, guards={"faithfulness": "warn"},
                        output={"variants": 3, "formats": ["txt", "jsonl"]})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and len(llm_server.chat_requests) == 3, out
    assert (images / "a.txt").read_text().splitlines()[0] == "Hatsune Miku with blue eyes smiles."
    (record,) = records(images)
    assert record["flags"] == ["says blue eyes where the tags say red eyes"]
    assert "flagged:  1 caption kept with faithfulness findings" in out


def test_the_summary_says_names_were_not_checked_when_no_tag_has_a_category(tmp_path, llm_server, danbooru, capsys):
    """Plain `.txt` tags and no tag source: `hatsune_miku` is just a tag, so no name is required,
    and the summary says so, once; with categories known (a sidecar) it says nothing."""
    llm_server.responder = scripted("A girl smiles.")
    images = tmp_path / "plain"
    for name in ("a.png", "b.png"):
        make_image(images / name)
        (images / name).with_suffix(".txt").write_text("hatsune_miku, 1girl, solo, smile", encoding="utf-8")
    config = config_for(tmp_path, llm_server, danbooru)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and len(llm_server.chat_requests) == 2, out
    (line,) = [line for line in out.splitlines() if "names:" in line]
    assert line == ("  names:    not checked for 2 images: their tags' categories are unknown (no sidecar and no tag "
                    "source answered); see docs/styles-and-guards.md#names-need-tag-categories")

    llm_server.responder = scripted("Hatsune Miku smiles.")
    known = sidecar_images(tmp_path / "known", **{"a.png": MIKU})
    code, out, _ = run_caption([str(known), "--config", str(config)], capsys)
    assert code == 0 and "names:" not in out, out

    llm_server.responder = scripted("A girl smiles.")  # a tag source answered: these tags are general
    looked_up = config_for(tmp_path, llm_server, danbooru, tag_provider={"skip": False})
    code, out, _ = run_caption([str(images), "--config", str(looked_up), "output.overwrite=true"], capsys)
    assert code == 0 and "names:" not in out and danbooru.looked_up(), out
