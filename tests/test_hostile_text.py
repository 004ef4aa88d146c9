"""Issue 14's corpus, part 1 (continued): captions are text. Control, bidi and other invisible
characters in a reply never reach a caption, a saved description or a JSONL record; newlines
and tabs are kept only where whitespace is kept; cleaning a hostile reply takes linear time
and a large good one is cleaned like a short one; a file name cannot forge output lines or
drive the terminal.

The configs come from test_hostile_layout.py, the servers from hostile_servers.py.
"""
from __future__ import annotations

import json
from pathlib import Path
import re

import pytest

from conftest import make_dataset, make_image, run_caption
from hostile_servers import (Say, booru, finish, llm, no_traceback, popen_caption,  # noqa: F401
                             prompt_tags)
from test_hostile_layout import tags_only, with_vision

pytestmark = pytest.mark.timeout(60)


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
    assert code == 1 and "Summary" in out
    # Cleaned in time, each is then judged for what it is, and nothing is saved as a caption.
    kinds = {Path(line["image"]).name: line["kind"]
             for line in map(json.loads, (images / "failures.jsonl").read_text().splitlines())}
    assert kinds == {"a.png": "guard_repetition", "b.png": "guard_reasoning"}
    assert (images / "a.txt").read_text() == "cat" and (images / "b.txt").read_text() == "dog"


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
