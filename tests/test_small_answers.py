"""The answers around a chat request are bounded too: a model list or `/props` that trickles
or never ends costs its deadline (and no memory), and a stream whose body stays open after
`[DONE]` keeps its finished reply. A raw loopback server writes exactly those bytes."""
from __future__ import annotations

import asyncio
import json
import resource
import socket
import threading
import time

import pytest

from conftest import make_dataset, run_caption, write_config
from tagcaption.config import EndpointConfig
from tagcaption.endpoint import Endpoint

COMPLETION_EVENTS = (b'data: {"choices":[{"index":0,"delta":{"content":"A red square."}}]}\n\n'
                     b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')


class OddServer:
    """GET /v1/models and /props answer as `models` and `props` say (`ok`, `trickle`, `endless`);
    POST answers a whole stream, then keeps the body open with pings (`after_done`)."""

    def __init__(self, models="ok", props="none", after_done="end"):
        self.models, self.props, self.after_done = models, props, after_done
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.stopped = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            try:
                head = b""
                while b"\r\n\r\n" not in head:
                    head += conn.recv(65536)
                line = head.split(b"\r\n")[0].decode()
                length = next((int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0)
                rest = head.split(b"\r\n\r\n", 1)[1]
                while len(rest) < length:
                    rest += conn.recv(65536)
                if line.startswith("GET /v1/models"):
                    self._answer(conn, self.models, b'{"object":"list","data":[{"id":"m"}]}')
                elif line.startswith("GET /props"):
                    self._answer(conn, self.props, b'{"total_slots": 4}')
                else:
                    self._stream(conn)
            except OSError:
                return

    def _answer(self, conn, mode, body):
        if mode == "none":
            conn.sendall(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        if mode == "ok":
            conn.sendall(b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
            return
        piece = b"x" if mode == "trickle" else b"x" * 1_000_000
        while not self.stopped.is_set():
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            if mode == "trickle":
                time.sleep(0.2)

    def _stream(self, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        conn.sendall(b"%x\r\n%s\r\n" % (len(COMPLETION_EVENTS), COMPLETION_EVENTS))
        while self.after_done == "ping" and not self.stopped.is_set():
            conn.sendall(b"9\r\n: ping\n\n\n\r\n")
            time.sleep(0.2)
        if self.after_done == "end":
            conn.sendall(b"0\r\n\r\n")

    def stop(self):
        self.stopped.set()
        self.sock.close()


@pytest.fixture
def odd():
    servers = []

    def start(**modes):
        servers.append(OddServer(**modes))
        return servers[-1]
    yield start
    for server in servers:
        server.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["trickle", "endless"])
def test_a_model_list_that_never_ends_costs_its_deadline_and_no_memory(odd, mode):
    server = odd(models=mode, props=mode)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    async def go():
        endpoint = Endpoint("default", EndpointConfig(base_url=server.url, concurrency="auto", timeout=5))
        started = time.monotonic()
        try:
            models = await endpoint.models_of(endpoint.replicas[0], 1.0)
            slots = await endpoint.probe_slots(endpoint.replicas[0])
        finally:
            await endpoint.replicas[0].close()
        return models, slots, time.monotonic() - started
    try:
        models, slots, seconds = asyncio.run(go())
    except Exception as exc:  # the trickle is a read that never finishes: a timeout, as a server that hangs
        assert mode == "trickle" and "within" in str(exc), exc
        return
    assert models == [] and slots.count is None and seconds < 8
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KB: not the gigabytes sent


@pytest.mark.timeout(60)
@pytest.mark.parametrize("transport", ["auto", "httpx"])
def test_a_finished_stream_whose_body_stays_open_keeps_its_caption(tmp_path, odd, danbooru, capsys, transport):
    server = odd(after_done="ping")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "red_square", "b.png": "red_square"})
    config = write_config(tmp_path / "config.yaml", server.url, danbooru.url, tag_provider={"skip": True},
                          endpoints={"default": {"transport": transport, "request_timeout": 30, "timeout": 10}},
                          output={"extension": ".caption"})
    started = time.monotonic()
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    assert (images / "a.caption").read_text() == "A red square." and time.monotonic() - started < 15
