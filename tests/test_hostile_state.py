"""Issue 14's corpus, part 2 (continued): state that survives. A tag cache or state file that
is not JSON, is damaged, is nested 100,000 deep or is a FIFO never costs a caption; every
summary is saved within about a second; SIGKILL mid-run leaves no half file and a rerun
finishes.

Runs that may hang go to a child process with a bound of its own (`finish`). The configs and
the `fifo` fixture come from test_hostile_deadlines.py.
"""
from __future__ import annotations

import json
import time

import pytest

from conftest import make_dataset, run_caption
from fake_servers import user_text
from hostile_servers import (Hang, booru, finish, llm, no_traceback, one_error_line, popen_caption,  # noqa: F401
                             temps, wait_for)
from test_hostile_deadlines import config_for, fifo, lock_released, with_danbooru  # noqa: F401

pytestmark = pytest.mark.timeout(60)


# === (3) state ==================================================================================


DEEP = "[" * 100_000


def test_a_tag_cache_that_is_not_json_is_moved_aside(tmp_path, llm, booru, capsys):
    booru.wiki = {"cat": "A small feline."}
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    (tmp_path / "tags_cache.json").write_bytes(b'{"tags": {"cat": {"summary": "A cat.", \xff\xfe')
    config = with_danbooru(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    no_traceback(err)
    assert "damaged" in err and "1 summarised" in out
    assert (images / "a.txt").read_text() == "A picture of cat."
    assert len(list(tmp_path.glob("tags_cache.json.corrupt-*"))) == 1
    assert "cat" in json.loads((tmp_path / "tags_cache.json").read_text())["tags"]


BROKEN_ENTRIES = {
    "nulls": {"summary": None, "wiki": None, "category": None, "post_count": None, "checked": None},
    "summary-number": {"summary": 5, "model": "instruct-model"},
    "checked-text": {"summary": None, "wiki": None, "checked": "yesterday"},
    "post-count-text": {"summary": "A cat.", "post_count": "many"},
    "category-list": {"summary": "A cat.", "category": ["general"]},
    "entry-list": ["A cat."],
    "wiki-number": {"summary": None, "wiki": 7, "checked": 1.0},
    "known-text": {"summary": None, "wiki": None, "known": "no", "checked": 1.0},
    "checked-true": {"summary": None, "wiki": None, "checked": True},
}


@pytest.mark.parametrize("name", list(BROKEN_ENTRIES))
def test_a_damaged_cache_entry_never_costs_a_caption(tmp_path, llm, booru, capsys, name):
    booru.wiki = {"cat": "A small feline."}
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    (tmp_path / "tags_cache.json").write_text(json.dumps({"version": 2, "tags": {"cat": BROKEN_ENTRIES[name]}}))
    config = with_danbooru(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    no_traceback(err)
    assert (images / "a.txt").read_text() == "A picture of cat."
    assert json.loads((tmp_path / "tags_cache.json").read_text())["tags"]["cat"]["summary"] == "A short summary."


@pytest.mark.parametrize("state", [
    "tags_cache",
    "captions.jsonl",
    "journal.jsonl",
    "settings.json",
    "lock",
    "failures.jsonl",
])
def test_a_state_file_nested_100000_deep_never_costs_a_caption(tmp_path, llm, booru, capsys, state):
    booru.wiki = {"cat": "A small feline."}
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    (images / ".tagcaption").mkdir()
    paths = {"tags_cache": tmp_path / "tags_cache.json", "failures.jsonl": images / "failures.jsonl"}
    path = paths.get(state, images / ".tagcaption" / state)
    path.write_text(DEEP + "\n")
    extra = []
    if state == "failures.jsonl":
        path.write_text(json.dumps({"image": str(images / "a.png"), "stage": "interpreter", "kind": "timeout",
                                    "message": "timed out", "attempts": 1}) + "\n" + DEEP + "\n")
        extra = ["--retry-failed"]
    config = with_danbooru(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), *extra], capsys)
    no_traceback(err)
    assert "unexpected" not in err
    assert code == 0, err
    assert (images / "a.txt").read_text() == "A picture of cat."


def test_damaged_remembered_settings_are_ignored(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    (images / ".tagcaption").mkdir()
    (images / ".tagcaption" / "settings.json").write_text(json.dumps(
        {"recursive": "yes", "tags_extension": 5, "output.formats": "txt", "output.dir": ["x"],
         "tags.sources": [1, 2], "output.extension": {"a": 1}}))
    config = config_for(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    no_traceback(err)
    assert (images / "a.txt").read_text() == "A picture of cat." and (images / "a.tags.txt").read_text() == "cat"


def test_a_tag_cache_that_is_a_fifo_does_not_hang_the_run(tmp_path, llm, booru, fifo):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    fifo(tmp_path / "tags_cache.json")
    config = with_danbooru(tmp_path, llm, booru)
    code, out, err, _ = finish(popen_caption([str(images), "--config", str(config)]), within=4)
    no_traceback(err)
    assert code in (0, 2), err
    if code == 2:
        one_error_line(err, "tags_cache.json")
    else:
        assert (images / "a.txt").read_text() == "A picture of cat."


def test_every_summary_is_saved_within_about_a_second(tmp_path, llm, booru):
    booru.wiki = {"tag0": "Tag zero.", "tag1": "Tag one.", "tag2": "Tag two."}

    def respond(request, headers):
        text = user_text(request)
        if '"tag1"' in text:
            time.sleep(0.1)  # arrives just after the first save
        elif '"tag2"' in text:
            return Hang()  # and then nothing more for a long while
        return None
    llm.hostile = respond
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "tag0", "b.png": "tag1", "c.png": "tag2"})
    config = with_danbooru(tmp_path, llm, booru, endpoints={"default": {"timeout": 60, "concurrency": 4}})
    cache = tmp_path / "tags_cache.json"

    def saved():
        try:
            return set(json.loads(cache.read_text())["tags"])
        except (OSError, ValueError, KeyError):
            return set()
    process = popen_caption([str(images), "--config", str(config)])
    try:
        assert wait_for(lambda: "tag0" in saved(), timeout=15)
        time.sleep(2.5)
        assert "tag1" in saved(), saved()
    finally:
        process.kill()
        process.communicate()


def test_sigkill_mid_run_leaves_no_half_file_and_a_rerun_finishes(tmp_path, llm, booru):
    llm.delay = 0.05
    images = tmp_path / "images"
    count = 24
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(count)})
    config = config_for(tmp_path, llm, booru, output={"formats": ["txt", "jsonl"]},
                        endpoints={"default": {"concurrency": 2}})
    process = popen_caption([str(images), "--config", str(config)])
    assert wait_for(lambda: len(list(images.glob("*.tags.txt"))) >= 5)
    process.kill()
    process.communicate()
    for n in range(count):  # each caption whole or not there: a tags file or our caption
        assert (images / f"{n:02}.txt").read_text() in (f"tag{n}", f"A picture of tag{n}.")
        kept = images / f"{n:02}.tags.txt"
        assert not kept.exists() or kept.read_text() == f"tag{n}"
    code, out, err, _ = finish(popen_caption([str(images), "--config", str(config)]), within=30)
    assert code == 0, err
    no_traceback(err)
    for n in range(count):
        assert (images / f"{n:02}.txt").read_text() == f"A picture of tag{n}."
        assert (images / f"{n:02}.tags.txt").read_text() == f"tag{n}"
    lines = (images / "captions.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["file"] for line in lines) == [f"{n:02}.png" for n in range(count)]
    assert temps(tmp_path) == [] and lock_released(images)
