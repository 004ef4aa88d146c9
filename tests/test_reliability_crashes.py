"""Crashes, locks, hand-edited captions and secrets (issue 3): SIGKILL and interrupts leave no
half file and a rerun finishes exactly the rest; a second run on a folder is refused and a dead
process's lock taken over; edited captions are kept as backups; an API key never appears in
output or files, and proxies are not applied to loopback servers; a sidecar that breaks the
parser, an unreadable tags file, file permissions, temp files and a folder walk that breaks off
cost no more than they must.

The helpers come from test_reliability.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, make_dataset, run_caption, write_config
from fake_servers import Error, Text, user_text
from test_reliability import FAST_RETRIES, SUMMARY, caption_for, no_partial_files, tags_only_config


def _popen_caption(args, **kwargs):
    return subprocess.Popen([sys.executable, str(ROOT / "caption.py"), "--no-progress", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, **kwargs)


def _wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.parametrize("kill_after", [1, 12, 30])
def test_sigkill_then_rerun_finishes_exactly_the_rest(tmp_path, llm_server, danbooru, kill_after):
    danbooru.wiki = {f"tag{n}": f"Tag {n}." for n in range(8)}

    def respond(request):
        if SUMMARY in user_text(request):
            return Text("A summary.")
        return caption_for(request)
    llm_server.responder = respond
    llm_server.delay = 0.02
    images = tmp_path / "images"
    count = 40
    make_dataset(images, {f"{n:02}.png": f"tag{n % 8}, extra{n}" for n in range(count)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          endpoints={"default": {"concurrency": 4}})
    process = _popen_caption([str(images), "--config", str(config)])
    assert _wait_for(lambda: len(list(images.glob("*.tags.txt"))) >= kill_after)
    process.kill()
    process.wait()
    first_run = sum(1 for r in llm_server.chat_requests if SUMMARY not in user_text(r))

    rerun = _popen_caption([str(images), "--config", str(config)])
    out, err = rerun.communicate(timeout=60)
    assert rerun.returncode == 0, err
    caption_requests = [r for r in llm_server.chat_requests if SUMMARY not in user_text(r)]
    # At most one request more per image that was in progress at the kill (2 x concurrency workers).
    assert len(caption_requests) <= count + 2 * 4, (first_run, len(caption_requests))
    for n in range(count):
        assert (images / f"{n:02}.txt").read_text() == f"A picture of tag{n % 8}, extra{n}."
        assert (images / f"{n:02}.tags.txt").read_text() == f"tag{n % 8}, extra{n}"
    json.loads((tmp_path / "tags_cache.json").read_text())
    no_partial_files(tmp_path)
    assert (images / ".tagcaption" / "lock").read_text() == ""  # released cleanly


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_stops_cleanly_with_summary(tmp_path, llm_server, danbooru, signum):
    llm_server.responder = caption_for
    llm_server.delay = 0.1
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(40)})
    config = tags_only_config(tmp_path, llm_server, danbooru, concurrency=2)
    process = _popen_caption([str(images), "--config", str(config), "output.extension=.caption"])
    assert _wait_for(lambda: len(list(images.glob("*.caption"))) >= 3)
    process.send_signal(signum)
    out, err = process.communicate(timeout=15)
    assert process.returncode == 130, err
    assert "Summary" in out and "not started" in out and "Next: rerun the same command" in out
    assert "Traceback" not in err
    written = list(images.glob("*.caption"))
    assert 3 <= len(written) < 40
    assert all(p.read_text() == f"A picture of tag{int(p.stem)}." for p in written)
    no_partial_files(tmp_path)
    assert (images / ".tagcaption" / "lock").read_text() == ""  # released cleanly


def test_second_run_on_same_folder_is_refused(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = caption_for
    llm_server.delay = 0.2
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": "cat" for n in range(6)})
    config = tags_only_config(tmp_path, llm_server, danbooru, concurrency=1)
    first = _popen_caption([str(images), "--config", str(config), "output.extension=.caption"])
    lock = images / ".tagcaption" / "lock"
    assert _wait_for(lambda: lock.exists() and lock.read_text().strip())
    holder = json.loads(lock.read_text())["pid"]
    code, _, err = run_caption([str(images), "--config", str(config), "output.extension=.caption"], capsys)
    assert code == 2
    assert str(lock) in err and f"pid {holder} on {socket.gethostname()}" in err
    first.communicate(timeout=30)
    assert first.returncode == 0
    assert len(llm_server.chat_requests) == 6


def test_lock_of_a_dead_process_is_taken_over(tmp_path, llm_server, danbooru, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    lock = images / ".tagcaption" / "lock"
    lock.parent.mkdir()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "started": "yesterday"}))
    llm_server.responder = caption_for
    config = tags_only_config(tmp_path, llm_server, danbooru)
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "took over the lock" in err and f"pid {dead.pid}" in err
    assert (images / "a.txt").read_text() == "A picture of cat."
    assert lock.read_text() == ""  # released cleanly


def test_hand_edited_caption_is_kept_when_overwriting(tmp_path, llm_server, danbooru, capsys):
    answers = iter(["First caption.", "Second caption.", "Third caption.", "Fourth caption."])
    llm_server.responder = lambda request: Text(next(answers))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    (images / "b.caption").write_text("Written by the user before any run.")
    config = tags_only_config(tmp_path, llm_server, danbooru)
    args = [str(images), "--config", str(config), "output.extension=.caption"]

    code, out, _ = run_caption(args, capsys)
    assert code == 0 and "1 captioned, 1 skipped" in out
    assert (images / "b.caption").read_text() == "Written by the user before any run."
    (images / "a.caption").write_text("First caption, fixed by hand.")

    code, out, _ = run_caption(args + ["output.overwrite=true"], capsys)
    assert code == 0 and "2 captioned" in out and "2 replaced captions kept" in out
    assert (images / "a.caption.bak").read_text() == "First caption, fixed by hand."
    assert (images / "b.caption.bak").read_text() == "Written by the user before any run."

    # Our own untouched captions are replaced without a backup.
    code, out, _ = run_caption(args + ["output.overwrite=true"], capsys)
    assert "backups" not in out
    assert sorted(p.name for p in images.glob("*.bak*")) == ["a.caption.bak", "b.caption.bak"]
    assert (images / "a.txt").read_text() == "cat" and (images / "b.txt").read_text() == "dog"


def test_api_key_never_appears_in_output_or_files(tmp_path, llm_server, danbooru, capsys):
    secret = "sk-test-SECRET-4f9a2b7c"

    def respond(request):
        if "dog" in user_text(request):
            return Error(400, {"error": {"message": f"Bad request for key {secret}", "type": "invalid_request_error"}})
        return caption_for(request)
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          endpoints={"default": {"api_key": secret, **FAST_RETRIES}})
    code, out, err = run_caption([str(images), "--config", str(config), "output.extension=.caption"], capsys)
    assert code == 1
    assert all(r.headers.get("authorization") == f"Bearer {secret}" for r in llm_server.requests)
    assert "Bad request for key ***" in out
    assert secret not in out + err
    for path in tmp_path.rglob("*"):
        if path.is_file() and path != config:
            assert secret.encode() not in path.read_bytes(), path


def test_proxy_settings_are_not_applied_to_loopback_servers(tmp_path, llm_server, danbooru):
    danbooru.wiki = {"cat": "A cat."}
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    env = dict(os.environ, HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
               ALL_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", NO_PROXY="")
    process = _popen_caption([str(images), "--config", str(config)], env=env)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 0, err
    assert "1 summarised" in out and danbooru.looked_up() == ["cat"]


def test_a_sidecar_that_breaks_the_parser_fails_one_image_without_hanging(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = caption_for
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": None})
    (images / "b.png.json").write_text("[" * 100000)
    config = tags_only_config(tmp_path, llm_server, danbooru)
    code, out, _ = run_caption([str(images), "--config", str(config), "output.extension=.caption"], capsys)
    assert code == 1 and "1 captioned" in out and "1 failed" in out
    assert (images / "a.caption").read_text() == "A picture of cat."


def test_unreadable_tags_file_in_the_shared_txt_layout_fails_one_image(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = caption_for
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    (images / "b.txt").unlink()
    (images / "b.txt").mkdir()
    config = tags_only_config(tmp_path, llm_server, danbooru)
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "1 captioned" in out and "1 failed" in out and "b.txt" in out
    assert (images / "a.txt").read_text() == "A picture of cat."


def test_file_permissions_are_kept(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = caption_for
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    os.chmod(images / "a.txt", 0o664)
    config = tags_only_config(tmp_path, llm_server, danbooru)
    run_caption([str(images), "--config", str(config)], capsys)
    assert (images / "a.txt").read_text() == "A picture of cat."
    assert oct((images / "a.txt").stat().st_mode & 0o777) == oct(0o664)
    assert oct((images / "a.tags.txt").stat().st_mode & 0o777) == oct(0o664)


def test_a_killed_runs_temp_files_are_removed_but_another_shards_write_is_not(tmp_path, llm_server, danbooru,
                                                                              capsys):
    """While another shard runs, a young temp file may be its caption being written."""
    from tagcaption.state import RunLock

    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    old = images / ".a.caption.tagcaption-x1y2z3.tmp"
    young = images / ".b.caption.tagcaption-q7r8s9.tmp"
    for temp in (old, young):
        temp.write_text("A half-written capt", encoding="utf-8")
    an_hour_ago = time.time() - 3600
    os.utime(old, (an_hour_ago, an_hour_ago))
    args = [str(images), "--config", str(tags_only_config(tmp_path, llm_server, danbooru)), "output.extension=.caption"]
    other_shard = RunLock(images / ".tagcaption" / "lock-2-of-2")
    other_shard.acquire()
    try:
        code, out, _ = run_caption(args, capsys)
    finally:
        other_shard.release()
    assert code == 0 and "2 captioned" in out
    assert not old.exists() and young.exists()

    make_dataset(images, {"c.png": "bird"})
    code, out, _ = run_caption(args, capsys)  # alone now: every temp file is a leftover
    assert code == 0 and "1 captioned, 2 skipped" in out
    assert not young.exists()


def test_a_walk_that_breaks_off_stops_the_run_with_its_summary(tmp_path, llm_server, danbooru):
    """Whatever stops the folder walk mid-run (here: a folder whose listing breaks at the 6th
    image) costs the rest of the walk, not the captions made or the summary."""
    from tagcaption.config import load_config
    from tagcaption.folder import Folder
    from tagcaption.run import Run
    from tagcaption.summary import format_summary

    class BreakingFolder(Folder):
        def listing(self, ordered=True):
            for folder, names in super().listing(ordered):
                if not ordered:  # the count of names
                    yield folder, names
                    continue
                yield folder, self._breaking(names)

        @staticmethod
        def _breaking(names):
            for number, name in enumerate(names, 1):
                if number == 6:
                    raise RuntimeError("the file server went away")
                yield name

    llm_server.responder = caption_for
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(10)})
    config = load_config(str(tags_only_config(tmp_path, llm_server, danbooru)), [], str(images))
    result = asyncio.run(Run(config, folder=BreakingFolder(images, False)).execute())
    summary = format_summary(result)
    assert result.stopped == "cannot go on reading the images folder: RuntimeError: the file server went away"
    assert "5 captioned" in summary and "5 not reached" in summary and "Next: rerun the same command when the folder" in summary
    assert sorted(p.name for p in images.glob("*.tags.txt")) == [f"{n:02}.tags.txt" for n in range(5)]
    no_partial_files(tmp_path)
