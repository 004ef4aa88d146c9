"""The HTTP side of the fake servers (fake_servers.py, fake_danbooru.py): a small real
threaded HTTP/1.1 server on 127.0.0.1, HTTPS if asked, that records every request it receives
(`Recorded`) and hands it to its owner's `handle`, with the handler's ways of answering
(`send_body`, `start_chunked`, `write_chunk`).
"""
from __future__ import annotations

import json
import ssl
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List, Optional, Union
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Recorded:
    method: str
    path: str
    query: Dict[str, List[str]]
    headers: Dict[str, str]
    body: Any


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 256  # the default 5 drops connections when a client opens dozens at once

    def handle_error(self, request, client_address) -> None:
        """A client that went away mid-reply (a run that stopped, a cancelled request) is no
        error of the server's; printing a traceback would end up in the output tests read."""


class FakeServer:
    def __init__(self):
        self.requests: List[Recorded] = []
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), self._handler_class())
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self.scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def use_tls(self, certfile, keyfile) -> "FakeServer":
        """Serve HTTPS with this certificate and key (before start)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certfile, keyfile)
        self._httpd.socket = context.wrap_socket(self._httpd.socket, server_side=True)
        self.scheme = "https"
        return self

    def start(self) -> "FakeServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def record(self, recorded: Recorded) -> None:
        with self._lock:
            self.requests.append(recorded)

    def handle(self, handler: "_Handler", method: str, path: str, query: dict, body: Any) -> None:
        raise NotImplementedError

    def _handler_class(self):
        server = self

        class Handler(_Handler):
            owner = server

        return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    owner: FakeServer

    def log_message(self, *args) -> None:
        pass

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionResetError, BrokenPipeError):
            pass  # a client that closed its connection, say after refusing a reply

    def _dispatch(self, method: str) -> None:
        parts = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode("utf-8", "replace")
        query = parse_qs(parts.query)
        self.owner.record(Recorded(method, unquote(parts.path), query, {k.lower(): v for k, v in self.headers.items()}, body))
        self.owner.handle(self, method, unquote(parts.path), query, body)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def send_body(self, status: int, body: Union[dict, list, str, bytes], content_type: Optional[str] = None,
                  headers: Optional[Dict[str, str]] = None) -> None:
        if isinstance(body, (dict, list)):
            data, content_type = json.dumps(body).encode(), content_type or "application/json"
        else:
            data = body if isinstance(body, bytes) else body.encode()
            content_type = content_type or "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def start_chunked(self, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()
