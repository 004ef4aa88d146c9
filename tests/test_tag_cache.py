"""The tag cache as state that survives (issue 14, item 3) and as a file to share (issue 17,
point 5): saved by a timer within about a second of each summary, entries of the wrong type
counted as absent, any unreadable file moved aside, and two caches combined."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, make_dataset, run_caption, write_config
from fake_servers import Text, user_text

ASKED = re.compile(r'Tag: "([^"]+)"')


def cached(path, tag):
    try:
        return json.loads(path.read_text())["tags"].get(tag)
    except (OSError, ValueError):
        return None  # not written yet


def test_a_summary_is_saved_within_a_second_even_when_no_other_follows(tmp_path, llm_server, danbooru):
    """`one` is saved at once; `two`, a moment later, by the timer — not only when the slow
    `three` arrives seconds afterwards (or at the end)."""
    danbooru.wiki = {"one": "One.", "two": "Two.", "three": "Three."}
    answered = {}
    release = threading.Event()

    def respond(request):
        asked = ASKED.search(user_text(request))
        if not asked:
            return Text("A caption.")
        if asked.group(1) == "two":
            time.sleep(0.3)
        if asked.group(1) == "three":
            release.wait(20)
        answered[asked.group(1)] = time.monotonic()
        return Text(f"Means {asked.group(1)}.")
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "one", "b.png": "two", "c.png": "three"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    env = {key: value for key, value in os.environ.items() if not key.endswith("_PROXY")}
    process = subprocess.Popen([sys.executable, str(ROOT / "caption.py"), str(images), "--config", str(config),
                                "--no-progress"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        cache = tmp_path / "tags_cache.json"
        deadline = time.monotonic() + 30
        while cached(cache, "two") is None and time.monotonic() < deadline:
            time.sleep(0.05)
        saved = time.monotonic()
        assert cached(cache, "two")["summary"] == "Means two."
        assert saved - answered["two"] < 2.0 and "three" not in answered
    finally:
        release.set()
        out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err.decode()
    assert cached(tmp_path / "tags_cache.json", "three")["summary"] == "Means three."  # and at the end


@pytest.mark.parametrize("entry", [
    {"summary": 5}, {"summary": "Old.", "post_count": "many"}, {"summary": "Old.", "known": "yes"},
    {"summary": "Old.", "implies": "long_hair"}, {"summary": "Old.", "implies": [1]}, {"summary": "Old.", "checked": True},
    {"summary": "Old.", "checked": float("nan")}, {"summary": "Old.", "category": "banana"},
    {"summary": "Old.", "source": "danbooru"}, {"summary": None, "checked": "yesterday"},
    {"summary": "Old.", "spelling": ["Cat"]}, {"summary": "Old.", "model": None, "template": 12}, ["Old."],
])
def test_an_entry_with_a_field_of_the_wrong_type_counts_as_absent(tmp_path, llm_server, danbooru, capsys, entry):
    danbooru.wiki = {"cat": "A cat."}
    llm_server.responder = lambda request: Text("Means cat." if ASKED.search(user_text(request)) else "A caption.")
    cache = tmp_path / "tags_cache.json"
    cache.write_text(json.dumps({"version": 2, "tags": {"cat": entry}}))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "1 summarised" in out, out
    assert danbooru.looked_up() == ["cat"]
    assert json.loads(cache.read_text())["tags"]["cat"]["summary"] == "Means cat."


@pytest.mark.parametrize("content", [
    b"[" * 100_000, b'{"version": 2, "tags": {"cat": ' + b'{"a": ' * 100_000, b'{"version": 2, "tags": {"cat": {"su',
    b"\xff\xfe not UTF-8 \xc3\x28", b"[1, 2, 3]", b'{"version": 2, "tags": []}', b"null", b"",
    b'{"version": 2, "tags": {}, "n": ' + b"9" * 5000 + b"}",
])
def test_a_cache_that_cannot_be_parsed_is_moved_aside_with_a_warning(tmp_path, llm_server, danbooru, capsys, content):
    danbooru.wiki = {"cat": "A cat."}
    llm_server.responder = lambda request: Text("Means cat." if ASKED.search(user_text(request)) else "A caption.")
    cache = tmp_path / "tags_cache.json"
    cache.write_bytes(content)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "1 captioned" in out, out + err
    assert err.count("is damaged") == 1 and "Traceback" not in err
    aside = list(tmp_path.glob("tags_cache.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert json.loads(cache.read_text())["tags"]["cat"]["summary"] == "Means cat."


def merge(*args):
    return subprocess.run([sys.executable, "-m", "tagcaption.tag_cache", "merge", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_two_caches_are_combined_entry_by_entry(tmp_path):
    mine, theirs = tmp_path / "mine.json", tmp_path / "theirs.json"
    mine.write_text(json.dumps({"version": 2, "tags": {
        "cat": {"summary": "A cat.", "wiki": "Cat.", "checked": 100},
        "dog": {"summary": None, "wiki": None, "checked": 500},
        "fox": {"summary": "A fox.", "wiki": "Fox.", "checked": 900},
        "bad": {"summary": 5}}}))
    theirs.write_text(json.dumps({"version": 2, "tags": {
        "cat": {"summary": "A newer cat.", "wiki": "Cat!", "checked": 300,
                "source": {"from": "dump", "file": "wiki_pages.parquet", "dated": "2026-05-01"}},
        "dog": {"summary": "A dog.", "wiki": "Dog.", "checked": 50},
        "fox": {"summary": "An older fox.", "wiki": "Fox.", "checked": 800},
        "owl": {"summary": "An owl.", "wiki": "Owl.", "checked": 10}}}))
    result = merge(mine, theirs)
    assert result.returncode == 0, result.stderr
    assert "4 tags from 2 caches" in result.stdout
    tags = json.loads(mine.read_text())["tags"]
    assert tags["cat"]["summary"] == "A newer cat." and tags["cat"]["source"]["file"] == "wiki_pages.parquet"
    assert tags["dog"]["summary"] == "A dog."  # a summary beats a newer "no wiki page"
    assert tags["fox"]["summary"] == "A fox." and tags["owl"]["summary"] == "An owl." and "bad" not in tags


def test_a_damaged_cache_is_not_merged(tmp_path):
    mine, broken = tmp_path / "mine.json", tmp_path / "broken.json"
    mine.write_text(json.dumps({"version": 2, "tags": {"cat": {"summary": "A cat."}}}))
    before = mine.read_text()
    broken.write_text('{"tags": {"cat": ')
    result = merge(mine, broken)
    assert result.returncode == 2 and f"cannot read tag cache {broken}" in result.stderr
    assert mine.read_text() == before
