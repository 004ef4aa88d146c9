"""Small real HTTP servers on 127.0.0.1 that speak the wire formats of an OpenAI-compatible
chat server and of Danbooru's JSON API, recording every request they receive.

Tests script their behaviour with a `responder` function; nothing in the code under test
is mocked. Tests import everything from here: this module holds the chat server
(`FakeOpenAIServer`) and its replies (`Text`, `Error`, `Fault`); the HTTP server both fakes
share is in fake_http.py and the Danbooru in fake_danbooru.py, re-exported here.
"""
from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

from fake_danbooru import CHALLENGE, NOT_FOUND, FakeDanbooru
from fake_http import FakeServer, Recorded

__all__ = ["CHALLENGE", "NOT_FOUND", "Error", "FakeDanbooru", "FakeOpenAIServer", "FakeServer", "Fault", "Recorded",
           "Reply", "Text", "default_responder", "user_text"]


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
