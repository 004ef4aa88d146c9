"""Small real HTTP servers on 127.0.0.1 that speak the wire formats of an OpenAI-compatible
chat server and of Danbooru's JSON API, recording every request they receive.

Tests script their behaviour with a `responder` function; nothing in the code under test
is mocked.
"""
from __future__ import annotations

import hashlib
import json
import re
import ssl
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, List, Optional, Union
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Text:
    """A successful chat reply."""
    content: str
    finish_reason: str = "stop"
    reasoning_content: Optional[str] = None
    usage: Optional[dict] = None
    """Added to the reply's `usage` (`prompt_tokens_details`…)."""
    timings: Optional[dict] = None
    """llama.cpp's `timings` (`cache_n`: prompt tokens taken from its cache), beside `usage`."""


@dataclass
class Error:
    """An HTTP error with a body, as real servers send them."""
    status: int
    body: Union[dict, list, str]
    headers: Dict[str, str] = field(default_factory=dict)


@dataclass
class Fault:
    """A misbehaving reply. kind: drop (close without answering), cut (stream stops mid-way),
    malformed (invalid JSON), empty_choices, stream_error (an error object inside a 200
    stream), hang (answer after `seconds`); hostile: endless (a stream that never ends, an
    event every `seconds`), trickle (a whole JSON reply, one byte every `seconds`), huge (a
    reply of `size` characters, streamed or not, sent at once); raw (`data` as an event
    stream, in pieces of `size` bytes)."""
    kind: str
    seconds: float = 0.0
    size: int = 0
    data: bytes = b""


Reply = Union[Text, Error, Fault]


@dataclass
class Recorded:
    method: str
    path: str
    query: Dict[str, List[str]]
    headers: Dict[str, str]
    body: Any


def user_text(request: dict) -> str:
    """All user-turn text of a chat request, joined (image parts left out)."""
    parts = []
    for message in request.get("messages", []):
        if message.get("role") != "user":
            continue
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts.extend(part.get("text", "") for part in content if part.get("type") == "text")
    return "\n".join(parts)


def default_responder(request: dict) -> Reply:
    digest = hashlib.sha1(json.dumps(request["messages"], sort_keys=True).encode()).hexdigest()[:12]
    return Text(f"Reply {digest} from {request.get('model')}.")


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


class FakeOpenAIServer(FakeServer):
    """`GET /v1/models` and `POST /v1/chat/completions`, streamed (SSE) or not."""

    def __init__(self, models=("local-model",), responder: Callable[[dict], Reply] = default_responder,
                 delay: float = 0.0, slots: Optional[int] = None, props: Optional[dict] = None,
                 owned_by: str = "fake"):
        super().__init__()
        self.models = list(models)
        self.props = props
        """What `GET /props` answers, like llama.cpp's llama-server (`{"total_slots": 4}`); None: 404."""
        self.owned_by = owned_by
        self.responder = responder
        self.delay = delay
        self.slots = threading.Semaphore(slots) if slots else None
        """Like a GPU server's parallel slots: requests beyond them wait their turn."""
        self.exchanges: List[tuple] = []
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    @property
    def chat_requests(self) -> List[dict]:
        return [r.body for r in self.requests if r.path == "/v1/chat/completions" and isinstance(r.body, dict)]

    def handle(self, handler, method, path, query, body) -> None:
        if method == "GET" and path == "/v1/models":
            handler.send_body(200, {"object": "list", "data": [
                {"id": model, "object": "model", "created": 0, "owned_by": self.owned_by} for model in self.models]})
        elif method == "GET" and path == "/props" and self.props is not None:
            handler.send_body(200, self.props)
        elif method == "POST" and path == "/v1/chat/completions":
            self._chat(handler, body)
        else:
            handler.send_body(404, {"error": {"message": f"Unknown route {method} {path}",
                                              "type": "invalid_request_error", "code": None}})

    def _chat(self, handler, request: dict) -> None:
        if not isinstance(request, dict):  # e.g. a client killed while sending its request
            handler.send_body(400, {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}})
            return
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.slots:
                with self.slots:
                    if self.delay:
                        time.sleep(self.delay)
            elif self.delay:
                time.sleep(self.delay)
            reply = self.responder(request)
            with self._lock:
                self.exchanges.append((request, reply))
            if isinstance(reply, Fault):
                self._fault(handler, request, reply)
            elif isinstance(reply, Error):
                handler.send_body(reply.status, reply.body, headers=reply.headers)
            elif request.get("stream"):
                self._stream(handler, request, reply)
            else:
                handler.send_body(200, self._completion(request, reply))
        finally:
            with self._lock:
                self.in_flight -= 1

    def _fault(self, handler, request: dict, fault: Fault) -> None:
        if fault.kind in ("endless", "trickle", "huge", "raw"):
            try:
                self._hostile(handler, request, fault)
            except (BrokenPipeError, ConnectionResetError):  # the client gave up on it, as it should
                handler.close_connection = True
            return
        stream = bool(request.get("stream"))
        if fault.kind == "drop":
            handler.close_connection = True
            handler.connection.shutdown(2)
        elif fault.kind == "hang":
            time.sleep(fault.seconds)
            handler.send_body(200, self._completion(request, Text("Too late.")))
        elif fault.kind == "malformed" and not stream:
            handler.send_body(200, '{"id": "chatcmpl-fake", "choices": [{"message": ', "application/json")
        elif fault.kind == "empty_choices" and not stream:
            completion = self._completion(request, Text(""))
            completion["choices"] = []
            handler.send_body(200, completion)
        elif stream:
            handler.start_chunked("text/event-stream")
            first = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                     "model": request.get("model"), "choices": [{"index": 0, "delta": {"content": "Half a"}}]}
            if fault.kind != "empty_choices":
                handler.write_chunk(f"data: {json.dumps(first)}\n\n".encode())
            if fault.kind == "cut":
                handler.close_connection = True
                handler.connection.shutdown(2)
                return
            if fault.kind == "malformed":
                handler.write_chunk(b"data: {not json\n\n")
            elif fault.kind == "stream_error":
                error = {"error": {"message": "upstream model crashed", "code": 500, "type": "server_error"}}
                handler.write_chunk(f"data: {json.dumps(error)}\n\n".encode())
            elif fault.kind == "empty_choices":
                empty = dict(first, choices=[])
                handler.write_chunk(f"data: {json.dumps(empty)}\n\n".encode())
            handler.write_chunk(b"data: [DONE]\n\n")
            handler.write_chunk(b"")
        else:
            raise ValueError(f"unknown fault {fault.kind}")

    def _hostile(self, handler, request: dict, fault: Fault) -> None:
        if fault.kind == "raw":
            handler.start_chunked("text/event-stream")
            for start in range(0, len(fault.data), fault.size or len(fault.data)):
                handler.write_chunk(fault.data[start:start + (fault.size or len(fault.data))])
            handler.write_chunk(b"")
        elif fault.kind == "trickle":
            data = json.dumps(self._completion(request, Text("Slowly, slowly."))).encode()
            handler.send_response(200)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            handler.end_headers()
            for byte in data:
                handler.wfile.write(bytes([byte]))
                handler.wfile.flush()
                time.sleep(fault.seconds)
        elif fault.kind == "huge" and not request.get("stream"):
            handler.send_body(200, self._completion(request, Text("x" * fault.size)))
        elif fault.kind == "huge":
            self._stream(handler, request, Text("x" * fault.size), piece=max(7, fault.size // 50))
        else:
            handler.start_chunked("text/event-stream")
            event = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0,
                     "model": request.get("model"), "choices": [{"index": 0, "delta": {"content": "and on "}}]}
            while True:
                handler.write_chunk(f"data: {json.dumps(event)}\n\n".encode())
                time.sleep(fault.seconds)

    @staticmethod
    def _usage(request: dict, reply: Text) -> dict:
        prompt = len(json.dumps(request["messages"])) // 4
        completion = max(1, len(reply.content) // 4)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                **(reply.usage or {})}

    def _completion(self, request: dict, reply: Text) -> dict:
        message = {"role": "assistant", "content": reply.content}
        if reply.reasoning_content is not None:
            message["reasoning_content"] = reply.reasoning_content
        completion = {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
                      "model": request.get("model"), "usage": self._usage(request, reply),
                      "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason}]}
        if reply.timings is not None:
            completion["timings"] = reply.timings
        return completion

    def _stream(self, handler, request: dict, reply: Text, piece: int = 7) -> None:
        def chunk(delta: dict, finish: Optional[str] = None) -> dict:
            return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": request.get("model"),
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        events = [chunk({"role": "assistant", "content": ""})]
        if reply.reasoning_content:
            events.append(chunk({"reasoning_content": reply.reasoning_content}))
        text = reply.content
        events += [chunk({"content": text[i:i + piece]}) for i in range(0, len(text), piece)]
        events.append(chunk({}, reply.finish_reason))
        if reply.timings is not None:
            events[-1]["timings"] = reply.timings
        if (request.get("stream_options") or {}).get("include_usage"):
            usage = chunk({})
            usage.update(choices=[], usage=self._usage(request, reply))
            events.append(usage)
        handler.start_chunked("text/event-stream")
        for event in events:
            handler.write_chunk(f"data: {json.dumps(event)}\n\n".encode())
        handler.write_chunk(b"data: [DONE]\n\n")
        handler.write_chunk(b"")


NOT_FOUND = {"success": False, "error": "ActiveRecord::RecordNotFound", "message": "That record was not found.",
             "backtrace": []}
CHALLENGE = (403, "<!DOCTYPE html><html><head><title>Just a moment...</title></head><body>Enable JavaScript and "
             "cookies to continue</body></html>", "text/html; charset=UTF-8", {"cf-mitigated": "challenge"})
"""What Cloudflare in front of Danbooru answers a challenged client (an `override` result)."""


class FakeDanbooru(FakeServer):
    """`/tags.json` (with the wiki page nested through `only=`), `/tag_aliases.json`,
    `/tag_implications.json`, `/wiki_pages.json` and `/wiki_pages/<title>.json`, like
    danbooru.donmai.us.

    `wiki` maps a title to its DText body; `tags` maps a name to its `category` and
    `post_count` (a tag with a wiki page exists as a general tag unless given here);
    `aliases` maps an antecedent to its consequent, `implications` an antecedent to its
    consequents (active ones); `other_names` a title to its page's other names; `deleted`
    holds deleted page titles. `override(path) -> (status, body, content_type[, headers]) | None`
    injects faults (`CHALLENGE`: Cloudflare's); `silent = True` makes it accept requests and
    never answer them.
    """

    def __init__(self, wiki: Optional[Dict[str, str]] = None, tags: Optional[Dict[str, dict]] = None):
        super().__init__()
        self.wiki = dict(wiki or {})
        self.deleted: set = set()
        self.tags = dict(tags or {})
        self.aliases: Dict[str, str] = {}
        self.implications: Dict[str, List[str]] = {}
        self.other_names: Dict[str, List[str]] = {}
        self.override: Callable[[str], Optional[tuple]] = lambda path: None
        self.silent = False
        self._released = threading.Event()

    def stop(self) -> None:
        self._released.set()
        super().stop()

    def api_requests(self) -> List[Recorded]:
        return [r for r in self.requests if r.path.endswith(".json")]

    def looked_up(self) -> List[str]:
        """Every tag name asked for in `/tags.json` requests, in order, repeats included."""
        names = []
        for r in self.requests:
            if r.path == "/tags.json":
                names += (r.query.get("search[name_comma]") or r.query.get("search[name]") or [""])[0].split(",")
        return names

    def asked(self, path: str) -> List[List[str]]:
        """The names of each request to `path` (`/tag_implications.json`…), by antecedent or name."""
        return [(r.query.get("search[antecedent_name_comma]") or r.query.get("search[name_comma]") or [""])[0]
                .split(",") for r in self.requests if r.path == path]

    def _page(self, title: str) -> dict:
        return {"id": abs(hash(title)) % 100000, "title": title, "body": self.wiki[title],
                "other_names": list(self.other_names.get(title, [])),
                "is_locked": False, "is_deleted": title in self.deleted,
                "created_at": "2020-01-01T00:00:00.000-05:00", "updated_at": "2024-01-01T00:00:00.000-05:00"}

    def _tag(self, index: int, name: str, only: str) -> dict:
        row = {"id": index, "name": name, "category": 0, "post_count": 100, "is_deprecated": False,
               "created_at": "2020-01-01T00:00:00.000-05:00", "updated_at": "2024-01-01T00:00:00.000-05:00"}
        if name in self.aliases:  # like Danbooru: an aliased tag stays, emptied of its posts
            row["post_count"] = 0
        row.update(self.tags.get(name, {}))
        if "wiki_page" in only:
            row["wiki_page"] = self._page(name) if name in self.wiki and name not in self.aliases else None
        if only:
            fields = {field.split("[")[0] for field in re.split(r",(?![^\[]*\])", only)}
            row = {key: value for key, value in row.items() if key in fields}
            if isinstance(row.get("wiki_page"), dict):
                nested = re.search(r"wiki_page\[([^\]]*)\]", only)
                if nested:
                    keep = set(nested.group(1).split(","))
                    row["wiki_page"] = {k: v for k, v in row["wiki_page"].items() if k in keep}
        return row

    def _relations(self, first: dict, table: Dict[str, object]) -> list:
        names = first.get("search[antecedent_name_comma]", "").split(",")
        status = first.get("search[status]")
        rows = []
        for name in names:
            found = table.get(name, [])
            for consequent in ([found] if isinstance(found, str) else found):
                rows.append({"id": len(rows), "antecedent_name": name, "consequent_name": consequent,
                             "status": "active"})
        return [row for row in rows if status in (None, row["status"])]

    def handle(self, handler, method, path, query, body) -> None:
        if self.silent:
            self._released.wait()
            return
        injected = self.override(path)
        if injected:
            status, payload, content_type, *headers = injected
            handler.send_body(status, payload, content_type, headers[0] if headers else None)
            return
        first = {key: values[0] for key, values in query.items()}
        only = first.get("only", "")
        if path.startswith("/wiki_pages/") and path.endswith(".json"):
            title = path[len("/wiki_pages/"):-len(".json")].lstrip("~")
            if title in self.wiki:
                handler.send_body(200, self._page(title))
            else:
                handler.send_body(404, NOT_FOUND)
        elif path == "/wiki_pages.json":
            titles = first.get("search[title_comma]", first.get("search[title]", "")).split(",")
            handler.send_body(200, [self._page(t) for t in titles if t in self.wiki])
        elif path == "/tags.json":
            names = first.get("search[name_comma]", first.get("search[name]", "")).split(",")
            known = [name for name in names if name in self.tags or name in self.wiki or name in self.aliases]
            handler.send_body(200, [self._tag(index, name, only) for index, name in enumerate(known)])
        elif path == "/tag_aliases.json":
            handler.send_body(200, self._relations(first, self.aliases))
        elif path == "/tag_implications.json":
            handler.send_body(200, self._relations(first, self.implications))
        else:
            handler.send_body(404, NOT_FOUND)
