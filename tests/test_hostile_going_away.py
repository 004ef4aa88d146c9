"""Issue 14's corpus, part 3: things going away mid-run (the images folder, the output
folder, the model server, Danbooru, stdout) and one bad input at the end of a run.

"Going away stops the run once": one `stopping:` line and the summary, not one failure
per remaining image; nothing recreated where the folder was; the lock released.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time

import pytest

from conftest import make_dataset, run_caption
from fake_servers import user_text
from hostile_config import with_danbooru as danbooru_config, short_config
from hostile_servers import Raw, booru, finish, llm, no_traceback, popen_caption, temps  # noqa: F401

pytestmark = pytest.mark.timeout(60)


def config_for(tmp_path, llm, booru, **sections):
    return short_config(tmp_path, llm, booru, defaults={"endpoints": {"default": {"max_retries": 0, "timeout": 5,
                                                                                  "concurrency": 2}}}, **sections)


def with_danbooru(tmp_path, llm, booru, **sections):
    return danbooru_config(config_for, tmp_path, llm, booru, danbooru_timeout=1, **sections)


def lines_starting(text, prefix):
    return [line for line in text.splitlines() if line.startswith(prefix)]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# === the images folder, the output folder ======================================================


@pytest.mark.parametrize("how, output_dir", [("renamed", False), ("renamed", True), ("deleted", False)],
                         ids=["renamed", "renamed-with-output-dir", "deleted"])
def test_the_images_folder_going_away_stops_the_run_once(tmp_path, llm, booru, capsys, how, output_dir):
    images = tmp_path / "images"
    moved = tmp_path / "moved"
    count = 30
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(count)})
    llm.delay = 0.02

    def go_away(number):
        if number == 6:
            images.rename(moved)  # at once, like a share unmounted or a folder moved
            if how == "deleted":
                shutil.rmtree(moved, ignore_errors=True)
    llm.before_chat = go_away
    out = tmp_path / "out"
    config = config_for(tmp_path, llm, booru, **({"output": {"dir": str(out)}} if output_dir else {}))
    code, stdout, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    no_traceback(stdout, err)
    assert "unexpected" not in err
    stopping = lines_starting(err, "stopping:")
    assert len(stopping) == 1 and "gone" in stopping[0], err
    assert lines_starting(err, "failed:") == [], err  # not the images' fault
    assert "Summary" in stdout and ("not started" in stdout or "not reached" in stdout), stdout
    assert not images.exists()  # nothing recreated where the folder was
    if how == "deleted":
        return
    assert (moved / ".tagcaption" / "lock").read_text() == ""
    for n in range(count):  # every tags file as it was, every caption whole
        tags = moved / f"{n:02}.txt"
        if output_dir:
            assert tags.read_text() == f"tag{n}"
            caption = out / f"{n:02}.txt"
            assert not caption.exists() or caption.read_text() == f"A picture of tag{n}."
        elif (moved / f"{n:02}.tags.txt").exists():
            assert (moved / f"{n:02}.tags.txt").read_text() == f"tag{n}"
            assert tags.read_text() in (f"tag{n}", f"A picture of tag{n}.")
        else:
            assert tags.read_text() == f"tag{n}"
    # and a rerun where the folder is now goes on from there (a write cut by the move may have left a temp file)
    llm.before_chat = None
    code, stdout, err = run_caption([str(moved), "--config", str(config)], capsys)
    assert code == 0, err
    written = out if output_dir else moved
    assert all((written / f"{n:02}.txt").read_text() == f"A picture of tag{n}." for n in range(count))
    assert all((moved / f"{n:02}.{'txt' if output_dir else 'tags.txt'}").read_text() == f"tag{n}" for n in range(count))
    assert temps(tmp_path) == [] and not images.exists()


def test_the_output_folder_going_away_stops_the_run_once(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(30)})
    out = tmp_path / "out"

    def go_away(number):
        if number == 6:  # captions may be written into it meanwhile: remove until it is gone
            while out.exists():
                shutil.rmtree(out, ignore_errors=True)
    llm.before_chat = go_away
    config = config_for(tmp_path, llm, booru, output={"dir": str(out)})
    code, stdout, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    no_traceback(stdout, err)
    assert len(lines_starting(err, "stopping:")) == 1, err
    assert len(lines_starting(err, "failed:")) <= 4, err
    assert all((images / f"{n:02}.txt").read_text() == f"tag{n}" for n in range(30))


# === the model server ============================================================================


def test_a_server_killed_mid_run_stops_the_run_once(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    count = 40
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(count)})
    llm.before_chat = lambda number: llm.kill() if number == 6 else None
    config = config_for(tmp_path, llm, booru)
    code, stdout, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    no_traceback(stdout, err)
    assert len(lines_starting(err, "stopping:")) == 1, err
    assert len(lines_starting(err, "failed:")) <= 4, f"{len(lines_starting(err, 'failed:'))} failed lines"
    assert "not started" in stdout
    assert all((images / f"{n:02}.txt").read_text() in (f"tag{n}", f"A picture of tag{n}.") for n in range(count))


def test_a_server_killed_mid_run_with_retries_stops_after_down_after(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    count = 40
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(count)})
    llm.before_chat = lambda number: llm.kill() if number == 6 else None
    config = config_for(tmp_path, llm, booru, endpoints={"default": {
        "max_retries": 1000, "retry_backoff": 0.01, "retry_max_backoff": 0.05, "down_after": 0.5}})
    started = time.monotonic()
    code, stdout, err = run_caption([str(images), "--config", str(config)], capsys)
    assert time.monotonic() - started < 10
    assert code == 1
    no_traceback(stdout, err)
    stopping = lines_starting(err, "stopping:")
    assert len(stopping) == 1 and "has not answered" in stopping[0], err
    assert lines_starting(err, "failed:") == []
    assert "not started" in stdout
    assert (images / ".tagcaption" / "lock").read_text() == ""


def test_an_enormous_error_page_costs_one_short_line(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    page = ("<html><body>" + "<p>upstream error, line after line</p>\n" * 30000 + "</body></html>").encode()
    llm.hostile = lambda request, headers: Raw(400, page, "text/html") if "cat" in user_text(request) else None
    config = config_for(tmp_path, llm, booru)
    code, stdout, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    no_traceback(stdout, err)
    failed = lines_starting(err, "failed:")
    assert len(failed) == 1 and len(failed[0]) < 1200, failed
    assert (images / "b.txt").read_text() == "A picture of dog." and (images / "a.txt").read_text() == "cat"
    record = json.loads((images / "failures.jsonl").read_text())
    assert "\n" not in record["message"] and len(record["message"]) < 1200


# === Danbooru never stops a run ==================================================================


def caption_made_with_tags_only(images, code, out, err):
    assert code == 0, err
    no_traceback(out, err)
    assert "unexpected" not in err and "stopping:" not in err
    assert (images / "a.txt").read_text() == "A picture of cat."
    assert (images / "b.txt").read_text() == "A picture of dog."


def test_danbooru_unreachable_never_stops_a_run(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = with_danbooru(tmp_path, llm, booru,
                           tag_provider={"danbooru_url": f"http://127.0.0.1:{closed_port()}"})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    caption_made_with_tags_only(images, code, out, err)
    assert len(lines_starting(err, "warning:")) == 1 and "tags only" in out


def test_danbooru_that_never_answers_never_stops_a_run(tmp_path, llm, booru, capsys):
    booru.hang_for = 3600
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = with_danbooru(tmp_path, llm, booru, tag_provider={"danbooru_timeout": 0.5})
    started = time.monotonic()
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert time.monotonic() - started < 5
    caption_made_with_tags_only(images, code, out, err)


GARBAGE = {
    "cloudflare-403": (403, "<html><title>Just a moment...</title></html>", "text/html"),
    "not-json": (200, "<html>maintenance</html>", "text/html"),
    "error-object": (200, {"success": False, "error": "RateLimiter::RateLimitError"}, "application/json"),
    "rows-of-nonsense": (200, [1, None, "x", {"name": None}, {"name": ""}, {"wiki_page": "x"}], "application/json"),
    "wrong-types": (200, [{"name": "cat", "category": "general", "post_count": "many", "wiki_page": "A cat."}],
                    "application/json"),
}


@pytest.mark.parametrize("name", list(GARBAGE))
def test_danbooru_answering_garbage_never_costs_a_caption(tmp_path, llm, booru, capsys, name):
    booru.override = lambda path: GARBAGE[name]
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = with_danbooru(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    caption_made_with_tags_only(images, code, out, err)


UNEXPECTED = {
    "nested-100000-deep": (200, "[" * 100_000, "application/json"),
    "redirect-loop": (302, "", "text/plain", {"Location": "/tags.json?again=1"}),
    "wiki-body-not-text": (200, [{"name": "cat", "category": 0, "post_count": 5,
                                  "wiki_page": {"body": ["A", "list"], "is_deleted": False}}], "application/json"),
    "name-not-text": (200, [{"name": ["cat"], "category": 0}], "application/json"),
}


@pytest.mark.parametrize("name", list(UNEXPECTED))
def test_danbooru_answering_the_unexpected_never_costs_a_caption(tmp_path, llm, booru, capsys, name):
    answer = UNEXPECTED[name]
    booru.override = lambda path: answer
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = with_danbooru(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    caption_made_with_tags_only(images, code, out, err)


# === one bad input at the end of a run ============================================================


def test_a_tags_file_with_nul_bytes_costs_its_image_not_the_review_page(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    (images / "a.txt").write_bytes(b"cat\x00\x00dog")
    config = config_for(tmp_path, llm, booru, output={"report": True})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    no_traceback(out, err)
    assert "unexpected" not in err and "cannot write the dataset files" not in err
    assert len(lines_starting(err, "failed:")) == 1
    assert "Summary" in out and "Review page:" in out
    page = (images / "captions.html").read_text()
    assert "a.png" in page and "NUL" in page and "A picture of dog." in page
    assert (images / "a.txt").read_bytes() == b"cat\x00\x00dog"


def test_a_tags_file_that_is_a_fifo_costs_its_image_not_the_review_page(tmp_path, llm, booru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": None, "b.png": "dog"})
    os.mkfifo(images / "a.txt")
    config = config_for(tmp_path, llm, booru, output={"report": True})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1
    no_traceback(out, err)
    assert "cannot write the dataset files" not in err
    assert "Review page:" in out and "a.png" in (images / "captions.html").read_text()


# === stdout and stderr going away ================================================================


def closed_pipe_run(args, which="stdout", **kwargs):
    """Run with the read end of stdout (or stderr) closed at once, as `| head -0` would."""
    process = popen_caption(args, **kwargs)
    getattr(process, which).close()
    other = process.stderr if which == "stdout" else process.stdout
    try:
        text = other.read()
        process.wait(timeout=30)
    finally:
        process.kill()
    return process.returncode, text


@pytest.mark.parametrize("extra", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_a_closed_stdout_produces_no_traceback(tmp_path, llm, booru, extra):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = config_for(tmp_path, llm, booru)
    code, err = closed_pipe_run([str(images), "--config", str(config), *extra])
    assert code == 0, err
    no_traceback(err)
    assert "BrokenPipeError" not in err and err.strip() == "", err
    if not extra:
        assert (images / "a.txt").read_text() == "A picture of cat."


def test_a_closed_stderr_keeps_the_exit_code_and_the_captions(tmp_path, llm, booru):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": None})  # b fails: its line goes to the closed stderr
    config = config_for(tmp_path, llm, booru)
    code, out = closed_pipe_run([str(images), "--config", str(config)], which="stderr")
    assert code == 1, out
    no_traceback(out)
    assert "1 captioned" in out and "1 failed" in out
    assert (images / "a.txt").read_text() == "A picture of cat."


def test_no_stdout_at_all_produces_no_traceback(tmp_path, llm, booru):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = config_for(tmp_path, llm, booru)
    process = popen_caption([str(images), "--config", str(config)], stdout=None, preexec_fn=lambda: os.close(1))
    code, out, err, _ = finish(process, within=30)
    no_traceback(err)
    assert code == 0, err
    assert (images / "a.txt").read_text() == "A picture of cat."
