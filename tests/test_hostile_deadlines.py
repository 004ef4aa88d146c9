"""Issue 14's corpus, part 2: deadlines (special files, stalled reads, servers that never
finish, SIGTERM and Ctrl-C) and state that survives (damaged state files, SIGKILL).

Runs that may hang, and every signal, go to a child process with a bound of its own
(`finish`): a case that hangs fails in seconds, and never holds up the suite.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import make_dataset, run_caption, write_config
from fake_servers import user_text
from hostile_servers import (Endless, Hang, Say, Trickle, booru, finish, llm,  # noqa: F401
                             no_traceback, one_error_line, popen_caption, snapshot, temps, template, unblock_fifo,
                             wait_for)

pytestmark = pytest.mark.timeout(60)

KNOWLEDGE = "TAGS: {tags}\nKNOWN:\n{tag_descriptions}\n"


def config_for(tmp_path, llm, booru, *, grace=1, file_timeout=2, **sections):
    """Tags only, no Danbooru, every wait short (unless `sections` say otherwise)."""
    sections.setdefault("interpreter", {})
    sections["interpreter"].setdefault("prompt_template", template(tmp_path))
    base = dict(tag_provider={"skip": True}, endpoints={"default": {"max_retries": 0, "timeout": 5}},
                file_timeout=file_timeout, stop_grace=grace)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return write_config(tmp_path / "config.yaml", llm.base_url, booru.url, **base)


def with_danbooru(tmp_path, llm, booru, **sections):
    """With Danbooru and tag summaries (the caption template uses {tag_descriptions})."""
    provider = {"skip": False, "danbooru_timeout": 2, "danbooru_retries": 0, **sections.pop("tag_provider", {})}
    return config_for(tmp_path, llm, booru, tag_provider=provider,
                      interpreter={"prompt_template": template(tmp_path, KNOWLEDGE, "knowledge.txt")}, **sections)


@pytest.fixture
def fifo(tmp_path):
    """Make FIFOs; at the end, let go any reader still stuck opening one (a daemon thread of an
    in-process run)."""
    made = []

    def make(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(path)
        made.append(path)
        return path
    yield make
    for path in made:
        unblock_fifo(path)


def started(images):
    """The child holds the folder's lock: the run is under way."""
    lock = images / ".tagcaption" / "lock"
    return lock.exists() and lock.read_text().strip() != ""


def lock_released(images):
    return (images / ".tagcaption" / "lock").read_text() == ""


# === (2) deadlines ==============================================================================


@pytest.mark.parametrize("layout", ["shared-txt", "caption-extension"])
def test_a_tags_file_that_is_a_fifo_fails_its_own_image(tmp_path, llm, booru, capsys, fifo, layout):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": None, "b.png": "dog"})
    fifo(images / "a.txt")
    extra = ["output.extension=.caption"] if layout == "caption-extension" else []
    config = config_for(tmp_path, llm, booru)
    before = time.monotonic()
    code, out, err = run_caption([str(images), "--config", str(config), *extra], capsys)
    assert time.monotonic() - before < 2 + 3  # within file_timeout and a little
    assert code == 1
    no_traceback(out, err)
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "a.png" in failed[0] and "a.txt" in failed[0], err
    assert "1 captioned" in out and "1 failed" in out
    caption = ".caption" if extra else ".txt"
    assert (images / f"b{caption}").read_text() == "A picture of dog."
    assert snapshot(images)["a.txt"][0] == "special"
    assert temps(tmp_path) == []


def test_an_image_that_is_a_fifo_does_not_hold_up_the_run(tmp_path, llm, booru, capsys, fifo):
    images = tmp_path / "images"
    make_dataset(images, {"b.png": "dog"})
    fifo(images / "a.png")
    (images / "a.txt").write_text("cat")
    config = config_for(tmp_path, llm, booru)
    before = time.monotonic()
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert time.monotonic() - before < 5
    no_traceback(out, err)
    assert (images / "b.txt").read_text() == "A picture of dog."
    assert (images / "a.txt").read_text() == "cat" and not (images / "a.tags.txt").exists()


def test_an_image_that_is_a_fifo_is_reported_as_failed(tmp_path, llm, booru, capsys, fifo):
    images = tmp_path / "images"
    make_dataset(images, {"b.png": "dog"})
    fifo(images / "a.png")
    (images / "a.txt").write_text("cat")
    config = config_for(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "a.png" in failed[0], err


@pytest.mark.parametrize("vision", [False, True], ids=["tags-only", "vision"])
def test_an_image_linked_to_a_fifo_fails_within_file_timeout(tmp_path, llm, booru, capsys, fifo, vision):
    """A link to a FIFO nobody writes: refused by `stat` at once, never opened."""
    images = tmp_path / "images"
    make_dataset(images, {"a.png": None, "b.png": "dog"})
    (images / "a.png").unlink()
    os.symlink(fifo(tmp_path / "stalled"), images / "a.png")
    (images / "a.txt").write_text("cat")
    sections = {"interrogator": {"skip": False, "endpoint": "default"},
                "interpreter": {"prompt_template": template(tmp_path, "TAGS: {tags}\n{description}\n", "v.txt")}} \
        if vision else {}
    config = config_for(tmp_path, llm, booru, file_timeout=1, **sections)
    before = time.monotonic()
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert time.monotonic() - before < 1 + 3
    assert code == 1
    no_traceback(out, err)
    failed = [line for line in err.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and "a.png" in failed[0] and "not a regular file" in failed[0], err
    assert (images / "b.txt").read_text().startswith("A picture of dog")
    assert (images / "a.txt").read_text() == "cat"


def test_a_fifo_beside_kept_tags_does_not_hang_the_walk(tmp_path, llm, booru, fifo):
    """a.txt (the caption) is a FIFO beside a.tags.txt; c.tags.txt (the kept tags) is one beside c.txt."""
    images = tmp_path / "images"
    make_dataset(images, {"a.png": None, "b.png": "dog", "c.png": None})
    fifo(images / "a.txt")
    (images / "a.tags.txt").write_text("cat")
    (images / "c.txt").write_text("A caption.")
    fifo(images / "c.tags.txt")
    config = config_for(tmp_path, llm, booru, file_timeout=1)
    code, out, err, _ = finish(popen_caption([str(images), "--config", str(config)]), within=4)
    no_traceback(err)
    assert code == 1 and "1 captioned" in out, out + err
    assert (images / "b.txt").read_text() == "A picture of dog."
    assert (images / "a.tags.txt").read_text() == "cat" and (images / "c.txt").read_text() == "A caption."


def test_a_template_that_is_a_fifo_is_refused(tmp_path, llm, booru, fifo):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm, booru, interpreter={"prompt_template": str(fifo(tmp_path / "t.txt"))})
    code, out, err, _ = finish(popen_caption([str(images), "--config", str(config)]), within=4)
    assert code == 2
    one_error_line(err, "t.txt")
    assert (images / "a.txt").read_text() == "cat"


@pytest.mark.parametrize("reply", [Endless(interval=0.2), Trickle(interval=0.2)], ids=["endless-stream", "trickle"])
def test_a_reply_that_never_ends_fails_after_request_timeout(tmp_path, llm, booru, reply):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    llm.hostile = lambda request, headers: reply if "cat" in user_text(request) else None
    config = config_for(tmp_path, llm, booru, endpoints={"default": {"timeout": 1, "request_timeout": 2,
                                                                     "stream": isinstance(reply, Endless)}})
    code, out, err, seconds = finish(popen_caption([str(images), "--config", str(config)]), within=8)
    assert code == 1, err
    no_traceback(err)
    assert "1 captioned" in out and "1 failed" in out and "a.png" in err
    assert (images / "a.txt").read_text() == "cat"


def test_a_reply_over_max_reply_bytes_is_refused(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    llm.hostile = lambda request, headers: Say("A cat. " + "Big " * 100_000)
    config = config_for(tmp_path, llm, booru, endpoints={"default": {"max_reply_bytes": 10_000}})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1, err
    no_traceback(err)
    assert "a.png" in err and (images / "a.txt").read_text() == "cat"


# --- interruptions ------------------------------------------------------------------------------


def assert_interrupted(code, out, err, images, seconds, bound):
    assert code == 130, err
    assert seconds < bound, seconds
    no_traceback(out, err)
    assert "Summary" in out and "stopping: interrupted (SIG" in err
    assert lock_released(images)
    assert temps(images) == []


def test_a_file_read_that_stalls_fails_after_its_deadline_and_leaves_its_thread_behind():
    """A read stuck in the kernel (a dead network share) cannot be killed: the awaiting image
    fails after the deadline, and the stuck thread is a daemon that cannot hold up the exit."""
    import asyncio
    import threading

    from tagcaption.deadlines import Stalled, off_loop

    released = threading.Event()

    async def read() -> None:
        await off_loop(released.wait, seconds=0.3, what="reading a.png")
    started = time.monotonic()
    with pytest.raises(Stalled, match="reading a.png did not finish within 0.3 s"):
        asyncio.run(read())
    assert time.monotonic() - started < 2
    stuck = [thread for thread in threading.enumerate() if thread.is_alive() and not thread.daemon
             and thread is not threading.main_thread()]
    released.set()
    assert stuck == []


@pytest.mark.parametrize("reply", [Hang(), Endless()], ids=["hanging", "endless-stream"])
def test_sigterm_ends_a_run_stuck_on_a_server_within_stop_grace(tmp_path, llm, booru, reply):
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": f"tag{n}" for n in range(6)})
    llm.hostile = lambda request, headers: reply
    config = config_for(tmp_path, llm, booru, grace=1, endpoints={"default": {"timeout": 60}})
    process = popen_caption([str(images), "--config", str(config)])
    assert wait_for(lambda: llm.chat_count >= 1)
    process.send_signal(signal.SIGTERM)
    code, out, err, seconds = finish(process, within=15)
    assert_interrupted(code, out, err, images, seconds, 1 + 4)
    assert "not started" in out
    assert all((images / f"{n}.txt").read_text() == f"tag{n}" for n in range(6))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c-twice", "sigterm-twice"])
def test_a_second_signal_cancels_what_is_in_flight_at_once(tmp_path, llm, booru, signum):
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": f"tag{n}" for n in range(4)})
    llm.hostile = lambda request, headers: Hang()
    config = config_for(tmp_path, llm, booru, grace=60, endpoints={"default": {"timeout": 60}})
    process = popen_caption([str(images), "--config", str(config)])
    assert wait_for(lambda: llm.chat_count >= 1)
    process.send_signal(signum)
    time.sleep(0.3)
    process.send_signal(signum)
    code, out, err, seconds = finish(process, within=15)
    assert_interrupted(code, out, err, images, seconds, 4)


def test_sigterm_ends_a_run_waiting_for_a_hanging_danbooru(tmp_path, llm, booru):
    booru.hang_for = 3600
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = with_danbooru(tmp_path, llm, booru, tag_provider={"danbooru_timeout": 60})
    process = popen_caption([str(images), "--config", str(config)])
    assert wait_for(lambda: booru.requests)
    process.send_signal(signal.SIGTERM)
    code, out, err, seconds = finish(process, within=15)
    assert_interrupted(code, out, err, images, seconds, 1 + 4)
    assert (images / "a.txt").read_text() == "cat"


@pytest.mark.parametrize("signum", [
    pytest.param(signal.SIGINT, id="ctrl-c"),
    pytest.param(signal.SIGTERM, id="sigterm"),
])
def test_a_signal_while_the_servers_are_checked_ends_the_run_cleanly(tmp_path, llm, booru, signum):
    llm.models_reply = Hang()
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm, booru)
    process = popen_caption([str(images), "--config", str(config)])
    assert wait_for(lambda: any(r.path == "/v1/models" for r in llm.requests))
    process.send_signal(signum)
    code, out, err, seconds = finish(process, within=15)
    assert code == 130, err
    no_traceback(out, err)
    assert seconds < 4
    assert (images / "a.txt").read_text() == "cat"


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
