"""Hostile loopback servers for tests/test_hostile*.py: the fake servers of fake_servers.py,
wrapped (never edited) so they can also stream forever, trickle a body, hang, refuse every
key, echo the request and its headers, send raw bytes, or die after a number of requests.

Only the public face of fake_servers.py is used (`handle`, `responder`, `requests`,
`chat_requests`, `delay`, the handler's `send_body` / `start_chunked` / `write_chunk`,
`FakeDanbooru.override`) besides what http.server's handler offers. A hostile reply is chosen
by `hostile(request, headers)` before the normal responder is asked; returning None lets the
fake server answer as it always does.

The second half holds what every case of the corpus checks (a snapshot of a folder, one
error line, no form of a key anywhere) and runs children with a bound (`popen_caption`,
`finish`), plus the `llm` and `booru` fixtures the test modules import.
"""
from __future__ import annotations

import base64
import html
import json
import os
import stat
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Union
from urllib.parse import quote, quote_plus

import pytest

from conftest import ROOT
from fake_servers import FakeDanbooru, FakeOpenAIServer, Text, user_text


@dataclass
class Endless:
    """A 200 stream that never finishes: one small delta every `interval` seconds."""
    interval: float = 0.1
    piece: str = "la "


@dataclass
class Trickle:
    """A complete, valid JSON completion sent `chunk` bytes every `interval` seconds."""
    content: str = "A slow caption."
    interval: float = 0.2
    chunk: int = 1


@dataclass
class Hang:
    """Accept the request and answer nothing for `seconds` (then drop the connection)."""
    seconds: float = 3600.0


@dataclass
class Raw:
    """Exactly these bytes as the body, with this status and content type."""
    status: int
    data: bytes
    content_type: str = "application/json"


@dataclass
class Say:
    """A normal successful reply with this content (streamed when the request asks for it)."""
    content: str
    finish_reason: str = "stop"


HostileReply = Union[Endless, Trickle, Hang, Raw, Say]
Hostile = Callable[[dict, Dict[str, str]], Optional[HostileReply]]


def _completion(request: dict, content: str, finish_reason: str = "stop") -> dict:
    return {"id": "chatcmpl-hostile", "object": "chat.completion", "created": int(time.time()),
            "model": request.get("model"), "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish_reason}]}


def _chunk(request: dict, delta: dict, finish: Optional[str] = None) -> bytes:
    event = {"id": "chatcmpl-hostile", "object": "chat.completion.chunk", "created": int(time.time()),
             "model": request.get("model"), "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return f"data: {json.dumps(event)}\n\n".encode()


class HostileLLM(FakeOpenAIServer):
    """FakeOpenAIServer plus hostile behaviours.

    - `hostile(request, headers)`: a HostileReply for a chat request, or None for the usual answer;
    - `refuse_all`: answer 401 to every route, the body echoing the Authorization header;
    - `models_reply`: a HostileReply for `GET /v1/models` (Hang, Raw);
    - `before_chat(n)`: called with the number of each chat request as it arrives (rename a
      folder, kill the server…);
    - `kill()`: from now on every request, on new or kept-alive connections, is dropped.
    """

    def __init__(self, *args, hostile: Optional[Hostile] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.hostile = hostile
        self.refuse_all = False
        self.models_reply: Optional[HostileReply] = None
        self.before_chat: Optional[Callable[[int], None]] = None
        self.chat_count = 0
        self.hostile_replies: list = []
        self.killed = threading.Event()
        self.closing = threading.Event()
        self._local = threading.local()
        self._count_lock = threading.Lock()

    def headers(self) -> Dict[str, str]:
        """The headers of the request being answered on this thread."""
        return getattr(self._local, "headers", {})

    def kill(self) -> None:
        self.killed.set()
        threading.Thread(target=self.stop, daemon=True).start()

    def stop(self) -> None:
        self.closing.set()
        super().stop()

    def handle(self, handler, method, path, query, body) -> None:
        headers = {key.lower(): value for key, value in handler.headers.items()}
        self._local.headers = headers
        if self.killed.is_set():
            _drop(handler)
            return
        if self.refuse_all:
            handler.send_body(401, {"error": {"message": f"Incorrect API key provided: "
                                                         f"{headers.get('authorization', '')}",
                                              "type": "invalid_request_error", "code": "invalid_api_key"}})
            return
        if method == "GET" and path == "/v1/models" and self.models_reply is not None:
            self._serve(handler, {}, self.models_reply)
            return
        if method == "POST" and path == "/v1/chat/completions" and isinstance(body, dict):
            with self._count_lock:
                self.chat_count += 1
                number = self.chat_count
            if self.before_chat is not None:
                self.before_chat(number)
            if self.killed.is_set():
                _drop(handler)
                return
            reply = self.hostile(body, headers) if self.hostile else None
            if reply is not None:
                with self._count_lock:
                    self.hostile_replies.append((body, reply))
                self._serve(handler, body, reply)
                return
        super().handle(handler, method, path, query, body)

    def _serve(self, handler, request: dict, reply: HostileReply) -> None:
        try:
            if isinstance(reply, Say):
                if request.get("stream"):
                    handler.start_chunked("text/event-stream")
                    handler.write_chunk(_chunk(request, {"role": "assistant", "content": ""}))
                    for start in range(0, len(reply.content), 50):
                        handler.write_chunk(_chunk(request, {"content": reply.content[start:start + 50]}))
                    handler.write_chunk(_chunk(request, {}, reply.finish_reason))
                    handler.write_chunk(b"data: [DONE]\n\n")
                    handler.write_chunk(b"")
                else:
                    handler.send_body(200, _completion(request, reply.content, reply.finish_reason))
            elif isinstance(reply, Raw):
                handler.send_body(reply.status, reply.data, reply.content_type)
            elif isinstance(reply, Endless):
                handler.start_chunked("text/event-stream")
                handler.write_chunk(_chunk(request, {"role": "assistant", "content": ""}))
                while not self.closing.is_set():
                    handler.write_chunk(_chunk(request, {"content": reply.piece}))
                    time.sleep(reply.interval)
            elif isinstance(reply, Trickle):
                data = json.dumps(_completion(request, reply.content)).encode()
                handler.send_response(200)
                handler.send_header("Content-Type", "application/json")
                handler.send_header("Content-Length", str(len(data)))
                handler.end_headers()
                for start in range(0, len(data), reply.chunk):
                    if self.closing.is_set():
                        break
                    handler.wfile.write(data[start:start + reply.chunk])
                    handler.wfile.flush()
                    time.sleep(reply.interval)
            elif isinstance(reply, Hang):
                self.closing.wait(reply.seconds)
                _drop(handler)
            else:
                raise ValueError(f"unknown hostile reply {reply!r}")
        except OSError:  # the client went away: what these replies are for
            handler.close_connection = True


def _drop(handler) -> None:
    handler.close_connection = True
    try:
        handler.connection.shutdown(2)
    except OSError:
        pass


class HostileDanbooru(FakeDanbooru):
    """FakeDanbooru whose `override(path)` can also read the request's headers (`headers()`)
    and hang (`hang_for` seconds before every answer, cut short when the server stops)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.closing = threading.Event()
        self.hang_for = 0.0
        self._local = threading.local()

    def headers(self) -> Dict[str, str]:
        return getattr(self._local, "headers", {})

    def stop(self) -> None:
        self.closing.set()
        super().stop()

    def handle(self, handler, method, path, query, body) -> None:
        self._local.headers = {key.lower(): value for key, value in handler.headers.items()}
        if self.hang_for:
            self.closing.wait(self.hang_for)
            if self.closing.is_set():
                _drop(handler)
                return
        super().handle(handler, method, path, query, body)


# --- what every case of the corpus checks ------------------------------------------------------

SECRET = "sk-test-SECRET-1234"
TAGS_TEMPLATE = "TAGS: {tags}\n"
KNOWLEDGE_TEMPLATE = "TAGS: {tags}\nKNOWN:\n{tag_descriptions}\n"
VISION_TEMPLATE = "TAGS: {tags}\nDESCRIPTION: {description}\n"


@pytest.fixture
def llm():
    server = HostileLLM(models=["instruct-model", "vision-model"]).start()
    server.responder = caption_from_tags
    yield server
    server.stop()


@pytest.fixture
def booru():
    server = HostileDanbooru().start()
    yield server
    server.stop()


def prompt_tags(request: dict) -> str:
    text = user_text(request)
    return text.split("TAGS: ", 1)[1].split("\n", 1)[0] if "TAGS: " in text else ""


def caption_from_tags(request: dict):
    """Captions carry their prompt's tags; anything else (a tag summary) gets a summary."""
    text = user_text(request)
    if "TAGS: " not in text:
        return Text("A short summary.")
    return Text(f"A picture of {prompt_tags(request) or 'something'}.")


def caption_prompts(server) -> List[str]:
    return [user_text(r) for r in server.chat_requests if "TAGS: " in user_text(r)]


def template(tmp_path: Path, text: str = TAGS_TEMPLATE, name: str = "template.txt") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def snapshot(root: Path) -> dict:
    """Every entry under `root` as it is: bytes for files, the target for links, the type of
    special files; to check that nothing was touched."""
    seen = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        mode = os.lstat(path).st_mode
        if stat.S_ISLNK(mode):
            seen[rel] = ("link", os.readlink(path))
        elif stat.S_ISREG(mode):
            seen[rel] = ("file", path.read_bytes())
        elif stat.S_ISDIR(mode):
            seen[rel] = ("dir",)
        else:
            seen[rel] = ("special", stat.S_IFMT(mode))
    return seen


def temps(root: Path) -> List[Path]:
    return [path for path in root.rglob("*") if path.name.endswith(".tmp")]


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text and "Exception ignored" not in text, text


def error_lines(err: str) -> List[str]:
    return [line for line in err.splitlines() if line.startswith("error:")]


def one_error_line(err: str, *words: str) -> str:
    """stderr is one `error:` line, no traceback, naming each of `words`."""
    no_traceback(err)
    lines = error_lines(err)
    assert len(lines) == 1 and len([line for line in err.splitlines() if line.strip()]) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def secret_forms(secret: str, login: str = "") -> List[str]:
    """A key as it may leave the program: as given, JSON-escaped, URL-encoded, HTML-escaped,
    and Danbooru's `login:api_key` as HTTP basic auth."""
    forms = {secret, json.dumps(secret)[1:-1], quote(secret, safe=""), quote_plus(secret),
             html.escape(secret, quote=True)}
    if login:
        forms.add(base64.b64encode(f"{login}:{secret}".encode()).decode())
    return sorted(forms)


def assert_no_secret(forms: Iterable[str], texts: Iterable[str] = (), roots: Iterable[Path] = (),
                     allowed: Iterable[Path] = ()) -> None:
    """No form of the key in any of `texts` or any file under `roots` (but the `allowed`
    inputs the user wrote the key into)."""
    forms = list(forms)
    allowed = {Path(path) for path in allowed}
    for text in texts:
        for form in forms:
            assert form not in text, f"{form!r} in output:\n{text}"
    for root in roots:
        for path in root.rglob("*"):
            if path in allowed or not path.is_file() or path.is_symlink():
                continue
            data = path.read_bytes()
            for form in forms:
                assert form.encode() not in data, f"{form!r} in {path}"


def popen_caption(args: List[str], **kwargs) -> subprocess.Popen:
    """`python caption.py` in a child process, as a user runs it (no proxy settings)."""
    env = {key: value for key, value in os.environ.items() if not key.lower().endswith("_proxy")}
    env.update(kwargs.pop("env", {}))
    options = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    options.update(kwargs)
    return subprocess.Popen([sys.executable, str(ROOT / "caption.py"), *args, "--no-progress"], **options)


def wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def finish(process: subprocess.Popen, within: float):
    """(exit code, stdout, stderr, seconds) of a child that must end within `within` s;
    a child still running then is killed and the case fails (it hung)."""
    started = time.monotonic()
    try:
        out, err = process.communicate(timeout=within)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"still running after {within:.0f} s (killed); stderr so far:\n{err}")
    return process.returncode, out, err, time.monotonic() - started


def unblock_fifo(path: Path) -> None:
    """Let a reader stuck opening the FIFO at `path` go (it reads end of file)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        return
    os.close(fd)
