"""Issue 14's corpus, part 1: the output layout. Where captions, kept tags and backups go,
and which files a run never reads as tags or replaces: an extension that is an image or a
sidecar, a second run with another extension or output folder, hand edits, an output folder
inside the images folder, two images with one stem, links.

Every case of the corpus runs `caption.py` end to end against the loopback servers of
hostile_servers.py and checks what the README promises: the exit code, one clear line and no
traceback, nothing lost (tags byte-identical, hand-made files untouched, no half file, no
`*.tmp`), nothing hanging. The rest of part 1 (test_hostile_check.py, test_hostile_text.py)
takes its configs (`tags_only`, `with_vision`) from here.
"""
from __future__ import annotations

import os

import pytest

from conftest import make_dataset, make_image, run_caption
from fake_servers import Text, user_text
from hostile_config import short_config
from hostile_servers import (VISION_TEMPLATE, booru, caption_from_tags, llm, no_traceback,  # noqa: F401
                             one_error_line, prompt_tags, snapshot, temps, template)

pytestmark = pytest.mark.timeout(60)


def tags_only(tmp_path, llm, booru, **sections):
    """A tags-only config (no Danbooru), every wait short."""
    return short_config(tmp_path, llm, booru, **sections)


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
