"""The built-in HTTP/1.1 transport (tagcaption/http1.py) against a raw loopback server that
writes exactly the bytes a case needs: chunked and gzipped replies, interim answers, idle
connections the server closed, redirects, bodies cut short, oversized headers. Each case goes
through `Endpoint.chat`, as every request of a run does; the rest of the suite runs whole
captioning runs over this transport, and the last cases here over httpx2 (`transport: httpx`)."""
from __future__ import annotations

import asyncio
import gzip
import json
import socket
import threading
import time
from typing import Callable, List, Optional

import pytest

from conftest import make_dataset, run_caption, write_config
from tagcaption.config import EndpointConfig
from tagcaption.endpoint import Endpoint, builtin_transport, is_loopback
from tagcaption.errors import LLMError

COMPLETION = {"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
                                                                           "content": "A red square."}}],
              "usage": {"prompt_tokens": 5, "completion_tokens": 3}}


def sse(text: str) -> bytes:
    events = [{"choices": [{"index": 0, "delta": {"content": text}}]},
              {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}]
    return b"".join(b"data: " + json.dumps(event).encode() + b"\n\n" for event in events) + b"data: [DONE]\n\n"


def reply(body: bytes, status: str = "200 OK", *headers: str, length: Optional[int] = None) -> bytes:
    head = [f"HTTP/1.1 {status}", *headers]
    if length is not None or not any(h.lower().startswith("transfer-encoding") for h in headers):
        head.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class RawServer:
    """Answers the n-th request with `script(n, request)`: the bytes to send (a float among
    them: seconds to wait), and whether to close the connection afterwards (`"half"`: stop sending but read on, answering nothing).
    Counts connections and keeps each request's head."""

    def __init__(self, script: Callable[[int, bytes], tuple]):
        self.script = script
        self.heads: List[bytes] = []
        self.connections = 0
        self.unanswered = 0
        """Reads on connections half-closed already (requests sent to a server that had stopped)."""
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            self._answer(conn)
        except OSError:  # the client hung up on a reply it refused
            pass

    def _answer(self, conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                self.heads.append(head)
                data, close = self.script(len(self.heads), head)
                for piece in data if isinstance(data, list) else [data]:
                    time.sleep(piece) if isinstance(piece, float) else conn.sendall(piece)
                if close == "half":
                    conn.shutdown(socket.SHUT_WR)
                    while conn.recv(65536):
                        self.unanswered += 1
                if close:
                    return

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def raw_server():
    servers = []

    def start(script):
        servers.append(RawServer(script))
        return servers[-1]
    yield start
    for server in servers:
        server.stop()


def ask(url: str, times: int = 1, pause: float = 0.0, settle: bool = False, **settings):
    """`times` chat requests to `url`, one after the other (`pause` seconds apart) on one
    endpoint, in a thread: a client that hangs (even one spinning the event loop, which no
    timeout of its own can stop) fails the test. `settle`: each request's error is returned
    in its place instead of raised."""
    outcome: list = []

    def run():
        try:
            outcome.append((True, asyncio.run(_ask(url, times, pause, settle, settings))))
        except BaseException as exc:  # handed to the test's thread
            outcome.append((False, exc))
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(30)
    if thread.is_alive():
        pytest.fail("the client hung")
    ok, result = outcome[0]
    if not ok:
        raise result
    return result


def _ask(url: str, times: int, pause: float, settle: bool, settings: dict):
    async def go():
        options = {"timeout": 5, "max_retries": 0, "retry_backoff": 0.01, **settings}
        endpoint = Endpoint("default", EndpointConfig(base_url=url, **options))
        answers: list = []
        try:
            for n in range(times):
                await asyncio.sleep(pause if n else 0)
                try:
                    answers.append(await endpoint.chat({"model": "m", "max_tokens": 10, "messages": [
                        {"role": "user", "content": "hi"}]}, lambda key, n: None))
                except LLMError as exc:
                    if not settle:
                        raise
                    answers.append(exc)
            return answers
        finally:
            for replica in endpoint.replicas:
                await replica.close()
    return go()


def test_a_chunked_stream_in_odd_pieces_with_trailers_and_kept_alive(raw_server):
    body = sse("A red square.")
    chunks = b"".join(b"%x;ext=1\r\n%s\r\n" % (len(part), part) for part in (body[:7], body[7:30], body[30:]))
    wire = reply(b"", "200 OK", "Content-Type: text/event-stream", "Transfer-Encoding: chunked") + chunks + \
        b"0\r\nX-Trailer: yes\r\n\r\n"
    server = raw_server(lambda n, head: ([wire[:50], wire[50:51], wire[51:]], False))
    answers = ask(server.url, times=3)
    assert [reply.text for reply, _ in answers] == ["A red square."] * 3
    assert server.connections == 1  # one connection carried all three
    head = server.heads[0].decode()
    assert head.startswith("POST /v1/chat/completions HTTP/1.1\r\n") and "\r\nHost: 127.0.0.1:" in head
    assert "Accept-Encoding" not in head and "Authorization: Bearer no-key" in head


def test_gzip_interim_answers_and_a_reply_framed_by_closing(raw_server):
    zipped = gzip.compress(json.dumps(COMPLETION).encode())
    replies = {
        1: (reply(zipped, "200 OK", "Content-Type: application/json", "Content-Encoding: gzip"), False),
        2: (b"HTTP/1.1 100 Continue\r\n\r\n" + reply(json.dumps(COMPLETION).encode()), False),
        3: (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + json.dumps(COMPLETION).encode(), True),
    }
    server = raw_server(lambda n, head: replies[n])
    assert [reply.text for reply, _ in ask(server.url, times=3)] == ["A red square."] * 3


def test_an_idle_connection_the_server_closed_is_not_reused(raw_server):
    server = raw_server(lambda n, head: (reply(json.dumps(COMPLETION).encode()), True))  # closes, says nothing
    assert len(ask(server.url, times=3)) == 3
    assert server.connections == 3 and len(server.heads) == 3  # no request was lost or sent twice


def test_a_redirect_is_followed_through_httpx(raw_server):
    def script(n, head):
        if b"/v2/" in head.split(b"\r\n")[0]:
            return reply(json.dumps(COMPLETION).encode()), False
        return reply(b"", "307 Temporary Redirect", "Location: /v2/chat/completions"), False
    server = raw_server(script)
    [(answer, _)] = ask(server.url, api_key="sk-secret")
    # httpx2 sends the request again from the start, so its own rules for redirects apply
    assert answer.text == "A red square." and [h.split(b" ")[1] for h in server.heads] == \
        [b"/v1/chat/completions", b"/v1/chat/completions", b"/v2/chat/completions"]
    assert all(b"\r\nAuthorization: Bearer sk-secret" in head for head in server.heads)  # the same origin


def test_a_redirect_to_another_origin_does_not_carry_the_api_key(raw_server):
    other = raw_server(lambda n, head: (reply(json.dumps(COMPLETION).encode()), False))
    target = other.url.replace("127.0.0.1", "localhost")  # the same machine, another origin
    server = raw_server(lambda n, head: (reply(b"", "307 Temporary Redirect",
                                               f"Location: {target}/chat/completions"), False))
    [(answer, _)] = ask(server.url, api_key="sk-secret")
    assert answer.text == "A red square." and len(other.heads) == 1
    assert b"sk-secret" not in other.heads[0] and b"POST /v1/chat/completions" in other.heads[0]
    assert b"sk-secret" in server.heads[0]


@pytest.mark.parametrize("wire, expected, attempts", [
    (reply(b'{"choices": [', length=500), "connection", 3),  # the body stops short, then the server hangs up
    (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", "headers longer than 64 KB", 3),
    (b"SMTP ready\r\n\r\n", "not an HTTP reply", 3),
    (b"HTTP/1.1 2\xb20 OK\r\n\r\n", "not an HTTP reply", 3),  # '2\xb20'.isdigit(), but not int()'s
    *((b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\n{}" % n, "malformed Content-Length", 3)
      for n in (b"\xb2", b"+2", b"2, 3")),
    (reply(b"", "200 OK", "Transfer-Encoding: chunked") + b"zz\r\n", "malformed chunk size", 3),
    (reply(b"", "200 OK", "Transfer-Encoding: chunked") + b"0\r\n" + b"X-T: y\r\n" * 9000, "trailers longer", 3),
    (b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + reply(b"{}"), "more than 16 interim (1xx) answers", 3),
    (reply(b"junk", "200 OK", "Content-Encoding: br"), "unsupported Content-Encoding 'br'", 1),  # will not change
])
def test_broken_framing_is_one_clear_error(raw_server, wire, expected, attempts):
    server = raw_server(lambda n, head: (wire, True))
    with pytest.raises(LLMError) as caught:
        ask(server.url, max_retries=2)
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert ("after 3 attempts" in str(caught.value)) == (attempts == 3) and len(server.heads) == attempts


@pytest.mark.parametrize("size", [b"-1", b"+3", b"0x3", b"0_3", b"3 3", b"", b"0" * 16 + b"3", b"\xb3"])
def test_a_chunk_size_is_plain_hex_digits(raw_server, size):
    # `int(..., 16)` takes all of these; "-1" made the client spin for good, the whole program with it
    wire = reply(b"", "200 OK", "Content-Type: application/json", "Transfer-Encoding: chunked") + \
        size + b"\r\nabc\r\n0\r\n\r\n"
    server = raw_server(lambda n, head: (wire, False))  # and then stalls
    with pytest.raises(LLMError) as caught:
        ask(server.url, timeout=2)
    assert "malformed chunk size" in str(caught.value)


def test_bare_line_feeds_end_header_lines_and_chunk_lines(raw_server):
    body = json.dumps(COMPLETION).encode()
    replies = {
        1: (b"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: %d\n\n%s" % (len(body), body), False),
        2: (b"HTTP/1.1 200 OK\r\nContent-Length: %d\n\r\n%s" % (len(body), body), False),
        3: (b"HTTP/1.1 200 OK\nTransfer-Encoding: chunked\r\n\n%x\n%s\n0\n\n" % (len(body), body), False),
    }
    server = raw_server(lambda n, head: replies[n])
    assert [reply.text for reply, _ in ask(server.url, times=3)] == ["A red square."] * 3
    assert server.connections == 1


def test_a_body_left_unread_closes_its_connection(raw_server):
    big = b"x" * 5000
    chunked = reply(b"", "200 OK", "Content-Type: application/json", "Transfer-Encoding: chunked") + \
        b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big)
    replies = {1: (chunked, False), 2: (reply(json.dumps(COMPLETION).encode()), False)}
    server = raw_server(lambda n, head: replies[n])
    refused, (answer, _) = ask(server.url, times=2, settle=True, max_reply_bytes=1000)  # the first half read
    assert "more than max_reply_bytes" in str(refused)
    assert answer.text == "A red square." and server.connections == 2 and len(server.heads) == 2


@pytest.mark.parametrize("pause", [0.0, 0.2])
def test_a_connection_the_server_half_closed_is_not_reused(raw_server, pause):
    # At once, the request may go out before the server's FIN is in: it goes again on a new connection
    server = raw_server(lambda n, head: (reply(json.dumps(COMPLETION).encode()), "half"))  # reads on, says nothing
    assert [reply.text for reply, _ in ask(server.url, times=3, pause=pause)] == ["A red square."] * 3
    assert server.connections == 3 and len(server.heads) == 3
    if pause:
        assert server.unanswered == 0  # a FIN that is in already: nothing is sent on it


def test_a_reused_connection_is_tried_again_only_if_the_server_said_nothing(raw_server):
    replies = {1: (reply(json.dumps(COMPLETION).encode()), False), 2: (b"SMTP ready\r\n\r\n", True)}
    server = raw_server(lambda n, head: replies.get(n, (reply(json.dumps(COMPLETION).encode()), False)))
    answer, refused = ask(server.url, times=2, settle=True)
    assert answer[0].text == "A red square." and "not an HTTP reply" in str(refused)
    assert len(server.heads) == 2  # the second request was answered (badly): not sent again


def test_a_silent_server_times_out_per_read(raw_server):
    server = raw_server(lambda n, head: ([b"HTTP/1.1 200 OK\r\n"], False))  # then nothing
    with pytest.raises(LLMError) as caught:
        ask(server.url, timeout=0.3)
    assert "timed out" in str(caught.value)


def test_which_requests_use_the_builtin_transport(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY", "no_proxy", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
    auto, httpx = EndpointConfig(), EndpointConfig(transport="httpx")
    assert builtin_transport("http://127.0.0.1:8080/v1", auto)
    assert builtin_transport("http://gpu-box.lan:8000/v1", auto)
    assert not builtin_transport("https://api.openai.com/v1", auto)  # TLS: httpx2
    assert not builtin_transport("http://127.0.0.1:8080/v1", httpx)
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    assert not builtin_transport("http://gpu-box.lan:8000/v1", auto)  # the proxy is used, by httpx2
    assert builtin_transport("http://localhost:1234/v1", auto)  # never a proxy for this machine
    for url in ("http://0.0.0.0:8080/v1", "http://[::]:8080/v1", "http://[::1]:8080/v1",
                "http://127.0.1.1:8080/v1", "http://[::ffff:127.0.0.1]:8080/v1", "http://LocalHost:1234/v1",
                "http://llm.localhost:8080/v1", "http://localhost.:8080/v1", "http://127.1:8080/v1",
                "http://2130706433:8080/v1", f"http://{socket.gethostname().upper()}:8080/v1",
                f"http://{socket.getfqdn()}:8080/v1"):
        assert is_loopback(url) and builtin_transport(url, auto), url  # this machine: no proxy
    for url in ("http://gpu-box.lan:8000/v1", "http://localhost.evil.example:80/v1", "http://10.0.0.5/v1",
                "http://1e100.net/v1", "http://10.1/v1", "http://[fe80::1]:8080/v1",
                f"http://{socket.gethostname()}.evil.example/v1"):
        assert not is_loopback(url), url
    monkeypatch.setenv("NO_PROXY", "gpu-box.lan")
    assert builtin_transport("http://gpu-box.lan:8000/v1", auto)


def test_this_machines_own_names_are_loopback_without_looking_others_up(monkeypatch):
    asked = []
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-box")
    monkeypatch.setattr(socket, "getfqdn", lambda: asked.append(1) or "gpu-box.example.lan")
    assert is_loopback("http://GPU-BOX:8080/v1") and not asked
    assert not is_loopback("http://other-box.example.lan/v1") and not asked  # not like this machine's name
    assert is_loopback("http://gpu-box.example.lan.:8080/v1") and asked
    assert not is_loopback("http://gpu-box.elsewhere.lan/v1")


@pytest.mark.parametrize("transport", ["auto", "httpx"])
def test_a_whole_run_over_either_transport(tmp_path, llm_server, danbooru, capsys, transport):
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": "red_square, simple_background" for n in range(6)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          endpoints={"default": {"transport": transport}}, tag_provider={"skip": True},
                          output={"extension": ".caption"})
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    assert len(llm_server.chat_requests) == 6 and len(list(images.glob("*.caption"))) == 6
    chats = [r for r in llm_server.requests if r.path == "/v1/chat/completions"]
    # httpx2 asks for compressed replies; the built-in client does not (it would not need them)
    assert {"accept-encoding" in r.headers for r in chats} == {transport == "httpx"}


def test_a_bad_transport_is_refused_with_its_choices(tmp_path, llm_server, danbooru, capsys):
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          endpoints={"default": {"transport": "aiohttp"}})
    code, _, err = run_caption([str(tmp_path), "--config", str(config)], capsys)
    assert code == 2 and "endpoints.default.transport must be" in err and "httpx" in err
