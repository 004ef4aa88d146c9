"""What a person sees (issue 15): the CLI in a pseudo-terminal and with its output
redirected to a file, as nohup, Slurm and containers do."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from conftest import ROOT, make_dataset, run_caption, write_config
from fake_servers import Text


def run_in_terminal(args, timeout=60.0) -> str:
    """`caption.py ARGS` with stdout and stderr on a pseudo-terminal; everything it printed."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a terminal of 120 columns
    env = {key: value for key, value in os.environ.items() if not key.endswith("_PROXY")}
    env.update(COLUMNS="120", LINES="40", TERM="xterm")
    process = subprocess.Popen([sys.executable, str(ROOT / "caption.py"), *args], stdin=follower, stdout=follower,
                               stderr=follower, env=env, cwd=ROOT, close_fds=True)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.2)
        if ready:
            try:
                data = os.read(leader, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif process.poll() is not None:
            break
    process.wait(timeout=10)
    os.close(leader)
    return b"".join(chunks).decode("utf-8", "replace")


def slow_tags_config(tmp_path, llm_server, danbooru):
    llm_server.delay = 0.02
    return write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                        endpoints={"default": {"base_url": llm_server.base_url, "concurrency": 2}})


def test_bars_in_a_terminal_are_stacked_and_never_overwrite_each_other(tmp_path, llm_server, danbooru):
    danbooru.wiki = {f"tag{n}": f"Tag number {n}." for n in range(12)}
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}, tag{(n + 1) % 12}" for n in range(12)})
    screen = run_in_terminal([str(images), "--config", str(slow_tags_config(tmp_path, llm_server, danbooru))])
    assert "12 captioned" in screen, screen[-2000:]
    frames = re.split(r"[\r\n]", screen)
    assert any(frame.lstrip().startswith("tags:") for frame in frames)
    assert any(frame.lstrip().startswith("images:") for frame in frames)
    assert not any("tags:" in frame and "images:" in frame for frame in frames), "two bars on one line"
    assert any("requests in flight" in frame for frame in frames)


def test_a_redirected_log_has_plain_lines_and_no_bar_frames(tmp_path, llm_server, danbooru):
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(20)})
    config = slow_tags_config(tmp_path, llm_server, danbooru)
    log = tmp_path / "run.log"
    with open(log, "w") as handle:
        result = subprocess.run([sys.executable, str(ROOT / "caption.py"), str(images), "--config", str(config)],
                                stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT, timeout=60)
    text = log.read_text()
    assert result.returncode == 0, text
    assert "\r" not in text and "\x1b[" not in text
    progress = [line for line in text.splitlines() if line.startswith("images ")]
    assert progress and re.fullmatch(r"images 20/20 \(100%\), [\d.]+/s, eta -, failed 0", progress[-1]), progress
    assert 2 <= len(progress) <= 21


def test_repeated_warnings_become_one_line_with_a_count(tmp_path, llm_server, danbooru):
    danbooru.wiki = {f"tag{n}": f"Tag number {n}." for n in range(10)}
    llm_server.responder = lambda request: Text("I'm sorry, I can't help with that." if "Tag:" in str(
        request["messages"]) else "A caption.")
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": f"tag{n}" for n in range(10)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, guards={"max_attempts": 1})
    result = subprocess.run([sys.executable, str(ROOT / "caption.py"), str(images), "--config", str(config),
                             "--no-progress"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("has no summary") == 3
    assert "warning: 10 tags have no summary" in result.stderr and "3 shown above; also" in result.stderr
    assert "1 request," not in result.stdout and "10 Danbooru requests" not in result.stdout


@pytest.mark.parametrize("override, line", [
    ("output.formats=jsonl", "error: output.formats: expected a list such as [txt,jsonl], got 'jsonl'"),
    ("tags.exclude=[a,b", "error: cannot read the override tags.exclude=[a,b: did not find expected ',' or ']'"),
    ("endpoints.default.timeout=soon", "error: endpoints.default.timeout: expected a number, got 'soon'"),
    ("output.overwrite=maybe", "error: output.overwrite: expected true or false, got 'maybe'"),
    ("interrogator.prompts=hello", "error: interrogator.prompts: expected a list such as"),
])
def test_config_errors_are_one_line_in_the_users_words(tmp_path, override, line, capsys):
    make_dataset(tmp_path / "images", {"a.png": "cat"})
    code, _, err = run_caption([str(tmp_path / "images"), override], capsys)
    assert code == 2 and err.strip().startswith(line) and len(err.strip().splitlines()) == 1, err


def test_check_names_no_model_warning_for_llama_cpp_and_suggests_a_way_off_danbooru(tmp_path, capsys):
    from fake_servers import FakeOpenAIServer

    server = FakeOpenAIServer(models=["model.gguf"]).start()
    server.owned_by = "llamacpp"
    try:
        config = write_config(tmp_path / "config.yaml", server.base_url, "http://127.0.0.1:9",
                              tag_provider={"danbooru_retries": 0, "model": "local"}, interpreter={"model": "local"})
        code, out, _ = run_caption(["check", "--config", str(config)], capsys)
    finally:
        server.stop()
    assert "is not among the models listed" not in out and "any name" in out
    assert code == 2 and "tag_provider.source=none" in out and "tag_provider.dump_dir" in out
