"""Issue 14's corpus, part 2: deadlines. Special files (FIFOs as tags files, images, links or
templates), stalled reads, replies that never end or are too big, SIGTERM and Ctrl-C.

Runs that may hang, and every signal, go to a child process with a bound of its own
(`finish`): a case that hangs fails in seconds, and never holds up the suite. State that
survives is in test_hostile_state.py, which takes its configs and the `fifo` fixture from here.
"""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from conftest import make_dataset, run_caption
from fake_servers import user_text
from hostile_config import with_danbooru as danbooru_config, short_config
from hostile_servers import (Endless, Hang, Say, Trickle, booru, finish, llm,  # noqa: F401
                             no_traceback, one_error_line, popen_caption, snapshot, temps, template, unblock_fifo,
                             wait_for)

pytestmark = pytest.mark.timeout(60)


def config_for(tmp_path, llm, booru, *, grace=1, file_timeout=2, **sections):
    """Tags only, no Danbooru, every wait short (unless `sections` say otherwise)."""
    return short_config(tmp_path, llm, booru, defaults={"file_timeout": file_timeout, "stop_grace": grace},
                        **sections)


def with_danbooru(tmp_path, llm, booru, **sections):
    return danbooru_config(config_for, tmp_path, llm, booru, **sections)


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
    words = " ".join(f"word{n}" for n in range(5_000))  # no loop for the repetition guard to see
    llm.hostile = lambda request, headers: Say(f"A cat. {words}")
    config = config_for(tmp_path, llm, booru, endpoints={"default": {"max_reply_bytes": 10_000}})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1, err
    no_traceback(err)
    (failure,) = [json.loads(line) for line in (images / "failures.jsonl").read_text().splitlines()]
    assert failure["kind"] == "reply_too_large" and "max_reply_bytes" in failure["message"]
    assert (images / "a.txt").read_text() == "cat"


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
