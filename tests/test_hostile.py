"""Issue 14's corpus, part 1: the output layout, numbers, `check`, and captions as text.

Every case runs `caption.py` end to end against the loopback servers of hostile_servers.py
and checks what the README promises: the exit code, one clear line and no traceback,
nothing lost (tags byte-identical, hand-made files untouched, no half file, no `*.tmp`),
nothing hanging. A case marked xfail(strict) is one the product does not keep yet; its
reason says what it does instead.
"""
from __future__ import annotations

import json
import os
import re

import pytest

from conftest import make_dataset, make_image, run_caption, write_config
from fake_servers import Text, user_text
from hostile_servers import (SECRET, VISION_TEMPLATE, Raw, Say, assert_no_secret, booru, caption_from_tags,  # noqa: F401
                             finish, llm, no_traceback, one_error_line, popen_caption, prompt_tags,
                             secret_forms, snapshot, temps, template)

pytestmark = pytest.mark.timeout(60)


def tags_only(tmp_path, llm, booru, **sections):
    """A tags-only config (no Danbooru), every wait short."""
    sections.setdefault("interpreter", {})
    sections["interpreter"].setdefault("prompt_template", template(tmp_path))
    base = dict(tag_provider={"skip": True}, endpoints={"default": {"max_retries": 0, "timeout": 5}},
                file_timeout=2, stop_grace=1)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return write_config(tmp_path / "config.yaml", llm.base_url, booru.url, **base)


def with_vision(tmp_path, llm, booru, **sections):
    return tags_only(tmp_path, llm, booru, interrogator={"skip": False, "endpoint": "default"},
                     interpreter={"prompt_template": template(tmp_path, VISION_TEMPLATE, "vision_template.txt")},
                     **sections)


def vision_and_captions(request):
    """The vision model describes; the instruct model captions from tags and description."""
    if any(isinstance(m.get("content"), list) for m in request["messages"]):
        return Text("A red rectangle.")
    return caption_from_tags(request)


# === (1) output layout ===========================================================================


@pytest.mark.parametrize("extension", [".png", ".jpg", ".JPEG", ".webp", ".json", ".tags.txt", ".caption.png"])
def test_an_extension_that_is_an_image_or_sidecar_is_refused_before_anything_is_written(
        tmp_path, llm, booru, capsys, extension):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.jpg": "dog"})
    (images / "a.png.json").write_text('{"tag_string_general": "cat"}')
    before = snapshot(images)
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), f"output.extension={extension}",
                                  "output.overwrite=true"], capsys)
    assert code == 2
    one_error_line(err, "output.extension", extension)
    assert snapshot(images) == before  # not even .tagcaption/
    assert llm.chat_requests == []


@pytest.mark.parametrize("second", ["output.extension=.caption", "output.dir=OUT"])
def test_a_second_run_elsewhere_never_reads_the_first_runs_captions_as_tags(tmp_path, llm, booru, capsys, second):
    """After a default run (captions in <stem>.txt, tags kept in <stem>.tags.txt, an untagged
    image captioned from its description), the README's own advice for keeping captions apart
    must not turn the first run's captions into tags."""
    llm.responder = vision_and_captions
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat, red_hair", "b.png": None})
    config = with_vision(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    first = {name: (images / name).read_text() for name in ("a.txt", "b.txt")}
    assert (images / "a.tags.txt").read_text() == "cat, red_hair"
    sent_before = len(llm.chat_requests)

    second = second.replace("OUT", str(tmp_path / "out"))
    code, out, err = run_caption([str(images), "--config", str(config), second], capsys)
    assert code == 0, err
    prompts = [user_text(r) for r in llm.chat_requests[sent_before:]]
    assert prompts
    for caption in first.values():
        assert all(caption.rstrip(".") not in prompt for prompt in prompts), (caption, prompts)
    assert sorted(prompt_tags(r) for r in llm.chat_requests[sent_before:] if "TAGS: " in user_text(r)) == \
        ["", "cat, red hair"]
    assert {name: (images / name).read_text() for name in ("a.txt", "b.txt")} == first
    assert (images / "a.tags.txt").read_text() == "cat, red_hair"
    assert not (images / "b.tags.txt").exists()


def test_an_edited_caption_of_ours_is_not_read_as_tags_by_a_run_with_another_extension(tmp_path, llm, booru,
                                                                                        capsys):
    llm.responder = vision_and_captions
    images = tmp_path / "images"
    make_dataset(images, {"b.png": None})
    config = with_vision(tmp_path, llm, booru)
    assert run_caption([str(images), "--config", str(config)], capsys)[0] == 0
    (images / "b.txt").write_text("red rectangle, fixed by hand")
    sent_before = len(llm.chat_requests)
    code, out, err = run_caption([str(images), "--config", str(config), "output.extension=.caption"], capsys)
    assert code == 0, err
    assert all("fixed by hand" not in user_text(r) for r in llm.chat_requests[sent_before:])
    assert (images / "b.txt").read_text() == "red rectangle, fixed by hand"


def test_a_hand_edit_of_an_untagged_images_caption_survives_a_rerun(tmp_path, llm, booru, capsys):
    llm.responder = vision_and_captions
    images = tmp_path / "images"
    make_dataset(images, {"b.png": None})
    config = with_vision(tmp_path, llm, booru)
    assert run_caption([str(images), "--config", str(config)], capsys)[0] == 0
    (images / "b.txt").write_text("red rectangle, fixed by hand")
    sent_before = len(llm.chat_requests)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    assert "0 captioned, 1 skipped" in out or "all 1 image have captions" in out, out
    assert len(llm.chat_requests) == sent_before
    assert (images / "b.txt").read_text() == "red rectangle, fixed by hand"
    assert not (images / "b.tags.txt").exists()


@pytest.mark.parametrize("edit", [None, "red rectangle, fixed by hand"])
def test_overwriting_an_untagged_images_caption_of_ours_never_turns_it_into_tags(tmp_path, llm, booru, capsys,
                                                                                  edit):
    """An edited caption is kept as a backup; neither kind is read as tags or kept as b.tags.txt."""
    llm.responder = vision_and_captions
    images = tmp_path / "images"
    make_dataset(images, {"b.png": None})
    config = with_vision(tmp_path, llm, booru)
    assert run_caption([str(images), "--config", str(config)], capsys)[0] == 0
    first = (images / "b.txt").read_text()
    if edit:
        (images / "b.txt").write_text(edit)
    sent_before = len(llm.chat_requests)
    code, out, err = run_caption([str(images), "--config", str(config), "output.overwrite=true"], capsys)
    assert code == 0, err
    assert "1 captioned" in out
    assert all((edit or first).rstrip(".") not in user_text(r) for r in llm.chat_requests[sent_before:])
    assert (images / "b.txt").read_text() == first
    assert not (images / "b.tags.txt").exists()
    assert [path.name for path in images.glob("b.txt.bak*")] == (["b.txt.bak"] if edit else [])
    if edit:
        assert (images / "b.txt.bak").read_text() == edit


def test_output_dir_inside_the_images_folder_is_skipped_by_the_walk(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "sub/b.png": "dog"})
    (images / "sub" / "b.txt").write_text("dog")
    out_dir = images / "captions"
    config = tags_only(tmp_path, llm, booru, recursive=True, output={"dir": str(out_dir)})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    assert (out_dir / "a.txt").read_text() == "A picture of cat."
    assert (out_dir / "sub" / "b.txt").read_text() == "A picture of dog."
    assert (images / "a.txt").read_text() == "cat" and (images / "sub" / "b.txt").read_text() == "dog"
    assert not (out_dir / "captions").exists() and not list(images.rglob("*.tags.txt"))
    sent = len(llm.chat_requests)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and len(llm.chat_requests) == sent, out
    assert "all 2 images have captions" in out


def test_untagged_images_get_no_empty_tags_files(tmp_path, llm, booru, capsys):
    llm.responder = vision_and_captions
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": None for n in range(5)})
    config = with_vision(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "5 captioned" in out, err
    assert list(images.rglob("*.tags.txt")) == []
    assert all((images / f"{n}.txt").read_text() == "A picture of something." for n in range(5))
    sent = len(llm.chat_requests)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "all 5 images have captions" in out and len(llm.chat_requests) == sent, out
    assert list(images.rglob("*.tags.txt")) == []


def test_two_images_with_one_stem_fail_instead_of_sharing_a_caption(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    make_image(images / "a.jpg")
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    no_traceback(out, err)
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "same name stem" in failed[0], err
    assert (images / "a.tags.txt").read_bytes() == b"cat"
    assert (images / "a.txt").read_text() == "A picture of cat."
    assert "2 captioned" in out and "1 failed" in out
    assert temps(tmp_path) == []


def test_an_image_whose_caption_is_anothers_kept_tags_fails_alone(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat, long_hair"})
    make_image(images / "a.tags.png")
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    no_traceback(out, err)
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "a.tags.png" in failed[0] and "a.tags.txt" in failed[0], err
    assert (images / "a.tags.txt").read_bytes() == b"cat, long_hair"
    assert (images / "a.txt").read_text() == "A picture of cat, long hair."


def test_a_caption_is_never_replaced_by_the_runs_own_files(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"failures.png": "cat", "b.png": "dog"})
    make_image(images / "untagged.png")  # fails: no tags, no vision
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), "output.extension=.jsonl"], capsys)
    no_traceback(out, err)
    if code == 2:  # refusing the extension is a way to keep the promise
        one_error_line(err, "output.extension")
        return
    assert code == 1, err
    assert (images / "failures.jsonl").read_text() == "A picture of cat."


def test_an_extension_with_a_path_separator_is_refused(tmp_path, llm, booru, capsys):
    images = tmp_path / "data" / "images"
    make_dataset(images, {"a.png": "cat"})
    config = tags_only(tmp_path, llm, booru)
    before = snapshot(tmp_path)
    code, out, err = run_caption([str(images), "--config", str(config), "output.extension=./../../escaped"], capsys)
    assert code == 2, out + err
    one_error_line(err, "output.extension")
    assert snapshot(tmp_path) == before


def test_output_dir_that_is_a_file_is_a_setup_error(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    (tmp_path / "out").write_text("my notes")
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), f"output.dir={tmp_path / 'out'}"], capsys)
    assert code == 2, err
    one_error_line(err, "out")
    assert "unexpected" not in err
    assert (tmp_path / "out").read_text() == "my notes" and (images / "a.txt").read_text() == "cat"


def test_a_tags_file_that_is_a_link_leaves_its_target_untouched(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": None})
    shared = tmp_path / "shared" / "tags.txt"
    shared.parent.mkdir()
    shared.write_bytes(b"cat, \xe2\x98\x95 coffee")
    os.symlink(shared, images / "a.txt")
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    assert shared.read_bytes() == b"cat, \xe2\x98\x95 coffee"
    assert (images / "a.tags.txt").read_bytes() == b"cat, \xe2\x98\x95 coffee"
    assert (images / "a.txt").read_text() == "A picture of cat, ☕ coffee."


def test_overwriting_a_caption_that_links_to_a_hand_made_file_keeps_that_file(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    notes = tmp_path / "notes.txt"
    notes.write_text("My own caption, written by hand.")
    os.symlink(notes, images / "a.caption")
    config = tags_only(tmp_path, llm, booru)
    args = [str(images), "--config", str(config), "output.extension=.caption"]
    code, out, err = run_caption(args, capsys)
    assert code == 0 and "all 1 image have captions" in out, out + err
    code, out, err = run_caption(args + ["output.overwrite=true"], capsys)
    assert code == 0, err
    assert notes.read_text() == "My own caption, written by hand."
    assert (images / "a.caption.bak").read_text() == "My own caption, written by hand."
    assert (images / "a.caption").read_text() == "A picture of cat."
    assert (images / "a.txt").read_text() == "cat"


# === (4) numbers ================================================================================


NONSENSE = [
    # (override, the key as the message names it, the numbers of its range)
    ("interrogator.max_image_size=-5", "interrogator.max_image_size", ["0"]),
    ("guards.repeat_limit=1", "guards.repeat_limit", ["2"]),
    ("endpoints.default.timeout=-1", "endpoints.default.timeout", ["0"]),
    ("postprocess.max_words=-3", "postprocess.max_words", ["1"]),
    ("endpoints.default.concurrency=1000000", "endpoints.default.concurrency", ["1", "1024"]),
    ("tag_provider.danbooru_concurrency=0", "tag_provider.danbooru_concurrency", ["1"]),
    ("stop_grace=-1", "stop_grace", ["0"]),
    ("file_timeout=0", "file_timeout", ["0"]),
    ("endpoints.default.down_after=0", "endpoints.default.down_after", ["0"]),
    ("endpoints.default.max_retries=-1", "endpoints.default.max_retries", ["0"]),
    ("tag_provider.danbooru_timeout=0", "tag_provider.danbooru_timeout", ["0"]),
    ("tag_provider.danbooru_batch_size=0", "tag_provider.danbooru_batch_size", ["1"]),
    ("tag_provider.danbooru_rate=-2", "tag_provider.danbooru_rate", ["0"]),
    ("guards.max_other_script=2", "guards.max_other_script", ["0", "1"]),
    ("endpoints.default.rest_after=0", "endpoints.default.rest_after", ["1"]),
]
NOT_A_NUMBER = ["endpoints.default.timeout=nan", "file_timeout=nan", "stop_grace=nan",
                "tag_provider.danbooru_timeout=nan"]


@pytest.mark.parametrize("override, key, bounds", NONSENSE, ids=[case[0] for case in NONSENSE])
def test_a_number_out_of_range_is_refused_when_the_config_is_read(tmp_path, llm, booru, capsys, override, key,
                                                                   bounds):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    before = snapshot(images)
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), override], capsys)
    assert code == 2
    line = one_error_line(err, key)
    numbers = re.findall(r"-?\d+(?:\.\d+)?", line.split(key, 1)[1])
    for bound in bounds:
        assert bound in numbers, line
    assert override.split("=", 1)[1] in line  # what was given
    assert snapshot(images) == before and llm.chat_requests == []


@pytest.mark.parametrize("override", NOT_A_NUMBER)
def test_not_a_number_is_refused_when_the_config_is_read(tmp_path, llm, booru, capsys, override):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), override], capsys)
    assert code == 2, out + err
    one_error_line(err, override.split("=", 1)[0])


@pytest.mark.parametrize("override", ["endpoints.default.concurrency=[4", "output.dir={a"])
def test_an_override_that_does_not_parse_is_one_line_and_exit_2(tmp_path, llm, booru, capsys, override):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), override], capsys)
    assert code == 2, err
    one_error_line(err, override.split("=")[0])


def test_a_number_out_of_range_in_a_config_file_is_refused_by_check_too(tmp_path, llm, booru, capsys):
    config = tags_only(tmp_path, llm, booru, guards={"repeat_limit": 1})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    one_error_line(err, "guards.repeat_limit", "2")
    assert llm.requests == []


# === (7) check ==================================================================================


def test_check_against_a_server_refusing_every_key_fails(tmp_path, llm, booru, capsys):
    llm.refuse_all = True
    config = tags_only(tmp_path, llm, booru, endpoints={"default": {"api_key": SECRET}})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    no_traceback(out, err)
    assert "Everything this config needs works" not in out
    assert "api_key" in out  # the fix names the key to set
    assert_no_secret(secret_forms(SECRET), [out, err])


def test_check_fails_when_only_the_chat_refuses_the_key(tmp_path, llm, booru, capsys):
    llm.hostile = lambda request, headers: Raw(401, json.dumps({"error": {
        "message": f"Incorrect API key provided: {headers.get('authorization')}", "type": "invalid_request_error",
        "code": "invalid_api_key"}}).encode())
    config = tags_only(tmp_path, llm, booru, endpoints={"default": {"api_key": SECRET}})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    no_traceback(out, err)
    assert "Everything this config needs works" not in out
    assert_no_secret(secret_forms(SECRET), [out, err])


def test_check_fails_when_the_server_forbids_everything(tmp_path, llm, booru, capsys):
    llm.hostile = lambda request, headers: Raw(403, b'{"error": {"message": "forbidden"}}')
    llm.models_reply = Raw(403, b'{"error": {"message": "forbidden"}}')
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    no_traceback(out, err)
    assert "Everything this config needs works" not in out


def test_check_fails_when_the_chat_answers_200_with_an_error_object(tmp_path, llm, booru, capsys):
    llm.hostile = lambda request, headers: Raw(200, b'{"error": {"message": "invalid api key", "code": 401}}')
    config = tags_only(tmp_path, llm, booru, endpoints={"default": {"stream": False}})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    no_traceback(out, err)
    assert "Everything this config needs works" not in out
    assert code == 2


def test_check_fails_when_danbooru_refuses_the_login(tmp_path, llm, booru, capsys):
    booru.override = lambda path: (401, {"success": False, "message": "SessionLoader::AuthenticationFailure"},
                                   "application/json")
    config = tags_only(tmp_path, llm, booru, tag_provider={"skip": False, "login": "someone", "api_key": SECRET},
                       interpreter={"prompt_template": template(tmp_path, "TAGS: {tags}\n{tag_descriptions}\n",
                                                                "knowledge.txt")})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    no_traceback(out, err)
    assert "Everything this config needs works" not in out and "tag source" in out
    assert_no_secret(secret_forms(SECRET, "someone"), [out, err])


def test_check_keeps_to_the_configured_timeout(tmp_path, llm, booru):
    from hostile_servers import Hang
    llm.hostile = lambda request, headers: Hang(120)
    config = tags_only(tmp_path, llm, booru, endpoints={"default": {"timeout": 1}})
    code, out, err, seconds = finish(popen_caption(["check", "--config", str(config)]), within=4)
    assert code == 2
    no_traceback(out, err)
    assert "Everything this config needs works" not in out


# === (8) captions are text ======================================================================


HIDDEN = {
    "nul": "A red\x00 cat.",
    "esc": "A \x1b[31mred\x1b[0m cat.",
    "c1": "A red\x85 cat\x9b.",
    "bidi-override": "A \u202ered\u202c cat.",
    "bidi-isolate": "A \u2066red\u2069 cat.",
    "marks": "A\u200f red\u200e cat\u061c.",
    "bom-and-del": "\ufeffA red\x7f cat.",
}
NOT_TEXT = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069\ufeff]")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "json"])
def test_control_and_bidi_characters_never_reach_a_caption(tmp_path, llm, booru, capsys, stream):
    images = tmp_path / "images"
    names = {name: f"{name}.png" for name in HIDDEN}
    make_dataset(images, {image: name for name, image in names.items()})
    llm.hostile = lambda request, headers: Say(HIDDEN[prompt_tags(request).replace(" ", "-")])
    config = tags_only(tmp_path, llm, booru, endpoints={"default": {"stream": stream}},
                       output={"formats": ["txt", "jsonl", "metadata"]})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    for name in HIDDEN:
        caption = (images / f"{name}.txt").read_text(encoding="utf-8")
        assert not NOT_TEXT.search(caption), (name, caption)
        assert "red" in caption and "cat" in caption
    for jsonl in (images / "captions.jsonl", images / "metadata.jsonl"):
        for line in jsonl.read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            assert not NOT_TEXT.search(record.get("caption", record.get("text", ""))), record


def test_an_ansi_colour_sequence_is_removed_whole(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    llm.hostile = lambda request, headers: Say("A \x1b[31mred\x1b[0m cat.")
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    assert (images / "a.txt").read_text() == "A red cat."


@pytest.mark.parametrize("collapse, expected", [
    (True, "A red cat sits. On a mat."),
    (False, "A red cat\tsits.\nOn a mat."),
])
def test_newline_and_tab_are_kept_only_where_whitespace_is_kept(tmp_path, llm, booru, capsys, collapse, expected):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    llm.hostile = lambda request, headers: Say("A red\x0b cat\tsits.\r\nOn a\x0c mat.")
    config = tags_only(tmp_path, llm, booru, postprocess={"collapse_whitespace": collapse})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    assert (images / "a.txt").read_text(encoding="utf-8") == expected


def test_unicode_line_separators_do_not_reach_a_caption_that_keeps_whitespace(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    llm.hostile = lambda request, headers: Say("A red cat\u2028sits.\u2029On a mat.")
    config = tags_only(tmp_path, llm, booru, postprocess={"collapse_whitespace": False})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    caption = (images / "a.txt").read_text(encoding="utf-8")
    assert "\u2028" not in caption and "\u2029" not in caption, repr(caption)


def test_a_description_saved_as_the_caption_is_text(tmp_path, llm, booru, capsys):
    """With the Interpreter off, the vision model's reply is the caption."""
    images = tmp_path / "images"
    make_dataset(images, {"a.png": None})
    llm.hostile = lambda request, headers: Say("A\x00 \u202ered\u202c \x1b[1mcat\u2066.")
    config = tags_only(tmp_path, llm, booru, interrogator={"skip": False, "endpoint": "default"},
                       interpreter={"skip": True})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    assert not NOT_TEXT.search((images / "a.txt").read_text(encoding="utf-8"))


def test_a_description_saved_beside_the_caption_is_text(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})

    def respond(request, headers):
        if any(isinstance(m.get("content"), list) for m in request["messages"]):
            return Say("A\x00 \u202ered\u202c \x1b[1mrectangle\u2066.")
        return None
    llm.hostile = respond
    config = with_vision(tmp_path, llm, booru, output={"formats": ["txt", "jsonl", "metadata"]})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    for jsonl in (images / "captions.jsonl", images / "metadata.jsonl"):
        record = json.loads(jsonl.read_text(encoding="utf-8").splitlines()[0])
        assert "rectangle" in record["description"]
        assert not NOT_TEXT.search(record["description"]), (jsonl.name, record)


def test_cleaning_hostile_replies_takes_linear_time(tmp_path, llm, booru):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    replies = {"cat": " *a" * 40000, "dog": "<think>x" * 20000}  # unclosed emphasis, unclosed reasoning
    llm.hostile = lambda request, headers: Say("A picture." + replies[prompt_tags(request)])
    config = tags_only(tmp_path, llm, booru, guards={"max_attempts": 1},
                       interpreter={"max_tokens": 100000}, endpoints={"default": {"stream": False}})
    code, out, err, seconds = finish(popen_caption([str(images), "--config", str(config)]), within=4)
    no_traceback(out, err)
    assert code in (0, 1) and "Summary" in out



def test_a_large_good_reply_is_cleaned_and_saved_like_a_short_one(tmp_path, llm, booru, capsys):
    """Past 20,000 characters a reply is cleaned in a thread: the caption is the same."""
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    words = " ".join(f"**w{n}** *v{n}*" for n in range(2500))
    llm.hostile = lambda request, headers: Say(f"Here is the caption: A picture of cat. {words}")
    config = tags_only(tmp_path, llm, booru, interpreter={"max_tokens": 100000})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    assert (images / "a.txt").read_text() == "A picture of cat. " + " ".join(f"w{n} v{n}" for n in range(2500))

def test_a_file_name_cannot_forge_lines_or_drive_the_terminal(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"b.png": "dog"})
    make_image(images / "evil\x1b[2J\nfailed: forged.png")  # no tags and no vision: fails
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    no_traceback(out, err)
    assert "\x1b" not in out + err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert (images / "b.txt").read_text() == "A picture of dog."
