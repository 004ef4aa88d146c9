"""A chat request on the wire: its body as bytes, and its reply read within bounds.

Chat requests go through the endpoint's own httpx2 client, not the OpenAI SDK's `post`:
per request, the SDK's option models, header building, JSON encoding and SSE decoder cost
more client CPU than everything else a vision request needs, and the body of a vision
request is mostly one base64 image that `json.dumps` would scan character by character.
Here the image is spliced into the JSON as bytes (base64 needs no escaping), replies are
read as plain JSON or server-sent events, and every reply is bounded three ways:

- `timeout`: connecting and each read (httpx2's own timeouts);
- `request_timeout`: the whole reply, stream included, from when the request leaves — a
  server that streams forever or trickles its body fails the attempt as a timeout;
- `max_reply_bytes`: a bigger reply is refused (`Kind.TOO_LARGE`), however it arrives.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import httpx2

from tagcaption.errors import Kind
from tagcaption.http1 import Pool
from tagcaption.replies import Fault, content_text, message_from_body, one_line, status_fault, status_message
from tagcaption.retry import parse_retry_after

ERROR_BODY_BYTES = 64 * 1024
"""An error answer is read this far: enough for any server's message."""
SPLICE_MIN = 4096
"""Characters from which a data URL is spliced in as bytes rather than encoded by json.dumps."""


class DataURL(str):
    """A `data:` URL made here, so known to be ASCII with nothing JSON must escape, that keeps
    its bytes: the request body takes them as they are (wire.py), without checking and
    encoding 400 KB of text again for every request."""

    raw: bytes

    @classmethod
    def of(cls, raw: bytes) -> "DataURL":
        url = cls(raw.decode("ascii"))
        url.raw = raw
        return url


@dataclass
class Reply:
    text: str
    finish_reason: Optional[str]


@dataclass(frozen=True)
class Bounds:
    request_timeout: float
    max_reply_bytes: int


DONE_GRACE = 2.0
"""Seconds a stream's body may go on after `[DONE]` before the reply is taken as it is."""
SMALL_BYTES = 1_000_000
"""A model list or a server's properties is read this far at most."""


@dataclass
class Small:
    """A small answer (`/models`, `/props`), read whole."""
    status_code: int
    text: str
    reason_phrase: str

    def json(self) -> Any:
        return json.loads(self.text)


async def get_small(http: httpx2.AsyncClient, url: Union[str, httpx2.URL], headers: Dict[str, str],
                    seconds: float) -> Small:
    """GET a small answer within `seconds` for the whole of it and SMALL_BYTES: a server that
    trickles or never ends its body costs this deadline, never the run. httpx2's errors for
    the transport's faults; DecodingError for a body too big to be one."""
    async def read() -> Small:
        async with http.stream("GET", url, headers=headers, timeout=seconds) as response:
            try:
                body = await _read(response, SMALL_BYTES)
            except Fault:
                raise httpx2.DecodingError(f"an answer of more than {SMALL_BYTES:,} bytes") from None
            return Small(response.status_code, body.decode("utf-8", "replace"), response.reason_phrase)
    try:
        return await asyncio.wait_for(read(), seconds)
    except asyncio.TimeoutError:
        raise httpx2.ReadTimeout(f"no whole answer within {seconds:g} s") from None


def encode_body(params: Dict[str, Any]) -> bytes:
    """`params` as JSON bytes; long `data:` URLs (images) are put in as they are. The
    caller's messages are not changed: only the image parts are copied."""
    urls: List[bytes] = []
    messages = params.get("messages")
    marked = dict(params, messages=[_marked(message, urls) for message in messages]) \
        if isinstance(messages, list) else params
    text = json.dumps(marked, separators=(",", ":")).encode()
    if not urls:
        return text
    if text.count(b'"\\u0000') != len(urls):  # some text of the request starts with a NUL of its own
        return json.dumps(params, separators=(",", ":")).encode()
    pieces = text.split(b'"\\u0000')
    out = [pieces[0]]
    for piece in pieces[1:]:
        index, rest = piece.split(b'\\u0000"', 1)
        out += [b'"', urls[int(index)], b'"', rest]
    return b"".join(out)


def _marked(message: Any, urls: List[bytes]) -> Any:
    """The message with each long data URL replaced by a marker (NUL, its index, NUL)."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list):
        return message
    parts = []
    for part in content:
        url = part.get("image_url", {}).get("url") if isinstance(part, dict) and \
            isinstance(part.get("image_url"), dict) else None
        raw = url.raw if isinstance(url, DataURL) else None
        if raw is None and isinstance(url, str) and len(url) >= SPLICE_MIN and url.startswith("data:") \
                and url.isascii() and '"' not in url and "\\" not in url and "\x00" not in url:
            raw = url.encode("ascii")
        if raw is not None:
            part = dict(part, image_url=dict(part["image_url"], url=f"\x00{len(urls)}\x00"))
            urls.append(raw)
        parts.append(part)
    return dict(message, content=parts)


async def exchange(http: Union[httpx2.AsyncClient, Pool], url: httpx2.URL, headers: Dict[str, str], body: bytes,
                   bounds: Bounds) -> Tuple[Reply, dict]:
    """POST `body` and read the reply (JSON or a stream) within `bounds`; raises Fault for
    an answer that is not a usable reply, httpx2's errors for the transport's."""
    try:
        return await asyncio.wait_for(_exchange(http, url, headers, body, bounds.max_reply_bytes),
                                      bounds.request_timeout)
    except asyncio.TimeoutError:
        raise Fault(Kind.TIMEOUT, f"no whole reply within request_timeout ({bounds.request_timeout:g} s)") from None


async def _exchange(http: Union[httpx2.AsyncClient, Pool], url: httpx2.URL, headers: Dict[str, str], body: bytes,
                    limit: int) -> Tuple[Reply, dict]:
    if isinstance(http, Pool):
        response = await http.post(url, headers, body)
    else:
        response = await http.send(http.build_request("POST", url, content=body, headers=headers), stream=True)
    try:
        return await _read_reply(response, limit)
    finally:
        await response.aclose()


async def _read_reply(response: httpx2.Response, limit: int) -> Tuple[Reply, dict]:
    if response.status_code >= 400:
        body = (await _read(response, ERROR_BODY_BYTES, cut=True)).decode("utf-8", "replace")
        raise status_fault(response.status_code, status_message(response.status_code, body,
                                                                 response.reason_phrase),
                           parse_retry_after(response.headers))
    declared = response.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:  # not '²', which int() refuses
        raise _too_large(limit, int(declared))
    if "text/event-stream" in response.headers.get("content-type", ""):
        return await _read_stream(response, limit)
    return completion_reply(await _read(response, limit))


async def _read(response: httpx2.Response, limit: int, cut: bool = False) -> bytes:
    """The body, up to `limit` bytes: past it, refused (or with `cut`, what came so far)."""
    parts, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > limit:
            if cut:
                parts.append(chunk[: len(chunk) - (size - limit)])
                break
            raise _too_large(limit)
        parts.append(chunk)
    return b"".join(parts)


def _too_large(limit: int, size: Optional[int] = None) -> Fault:
    said = f"{size:,} bytes, more than max_reply_bytes ({limit:,})" if size else \
        f"more than max_reply_bytes ({limit:,} bytes)"
    return Fault(Kind.TOO_LARGE, f"reply refused: {said}")


def body_error(body: dict) -> str:
    """One line for an error object inside a 200 (a JSON reply or a stream event): its
    message, or the object itself when it has none (`{"code": 503, "type": "overloaded"}`)."""
    return one_line(message_from_body(body) or json.dumps(body.get("error", body))[:300])


def completion_reply(data: bytes) -> Tuple[Reply, dict]:
    """The answer of a JSON (non-streamed) chat completion."""
    try:
        completion = json.loads(data)
    except ValueError:
        raise Fault(Kind.MALFORMED_REPLY, "malformed reply (not JSON: "
                                          f"{one_line(data.decode('utf-8', 'replace'), 80)})") from None
    if not isinstance(completion, dict):
        raise Fault(Kind.MALFORMED_REPLY, f"malformed reply ({one_line(str(completion), 80)})")
    if completion.get("error"):
        raise Fault(Kind.REPLY_ERROR, f"error in the reply: {body_error(completion)}")
    choices = completion.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise Fault(Kind.EMPTY_CHOICES, "reply had no choices")
    message = choices[0].get("message") or {}
    return Reply(content_text(message.get("content") if isinstance(message, dict) else None),
                 choices[0].get("finish_reason")), _usage(completion)


def _usage(body: dict) -> dict:
    """The reply's `usage`, with llama.cpp's `timings` beside it (its count of cached prompt tokens)."""
    usage = body.get("usage")
    usage = dict(usage) if isinstance(usage, dict) else {}
    if isinstance(body.get("timings"), dict):
        usage["timings"] = body["timings"]
    return usage


class _Stream:
    """The state of a streamed reply as its events arrive."""

    def __init__(self) -> None:
        self.parts: List[str] = []
        self.finish_reason: Optional[str] = None
        self.usage: dict = {}
        self.saw_choice = False
        self.done = False

    def event(self, name: bytes, data: bytes) -> None:
        if data == b"[DONE]" or self.done:  # the body is still read to its end, to keep the connection
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            raise Fault(Kind.MALFORMED_REPLY, "malformed reply stream (an event is not JSON)") from None
        if isinstance(chunk, dict) and (chunk.get("error") or name == b"error"):
            raise Fault(Kind.STREAM_ERROR, f"error in the reply stream: {body_error(chunk)}")
        if not isinstance(chunk, dict) or not isinstance(chunk.get("choices", []), list):
            raise Fault(Kind.MALFORMED_REPLY, "malformed reply stream")
        self.usage.update(_usage(chunk))  # llama.cpp sends `timings` with the last choice, `usage` after it
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict):
                raise Fault(Kind.MALFORMED_REPLY, "malformed reply stream")
            self.saw_choice = True
            delta = choice.get("delta")
            content = content_text(delta.get("content")) if isinstance(delta, dict) else ""
            if content:
                self.parts.append(content)
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def reply(self) -> Tuple[Reply, dict]:
        if not self.saw_choice:
            raise Fault(Kind.EMPTY_CHOICES, "reply stream had no choices")
        if self.finish_reason is None:
            raise Fault(Kind.STREAM_CUT, "reply stream ended before the model finished")
        if self.finish_reason == "error":
            raise Fault(Kind.STREAM_ERROR, "the server reported an error inside the reply stream")
        return Reply("".join(self.parts), self.finish_reason), self.usage


async def _read_stream(response: httpx2.Response, limit: int) -> Tuple[Reply, dict]:
    """Server-sent events (`data:` lines, a blank line ending each event, `:` comments
    ignored, `event: error` an error) up to `[DONE]`, and the body to its end (so the
    connection can be kept) — but a body still open DONE_GRACE after `[DONE]` (keep-alive
    pings, a missing last chunk) costs the connection, never the finished reply."""
    stream = _Stream()
    pending = bytearray()
    name, data = b"", []
    size = 0
    chunks, after_done = response.aiter_bytes().__aiter__(), None
    while True:
        if stream.done and after_done is None:
            after_done = time.monotonic() + DONE_GRACE
        try:
            chunk = await (asyncio.wait_for(chunks.__anext__(), max(0.0, after_done - time.monotonic()))
                           if after_done is not None else chunks.__anext__())
        except (StopAsyncIteration, asyncio.TimeoutError):
            break
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        pending += chunk
        if b"\n" not in chunk:
            continue
        lines = bytes(pending).split(b"\n")
        pending = bytearray(lines.pop())
        for line in lines:
            line = line.rstrip(b"\r")
            if not line:
                if data:
                    stream.event(name, b"\n".join(data))
                name, data = b"", []
            elif not line.startswith(b":"):
                field, _, value = line.partition(b":")
                value = value[1:] if value.startswith(b" ") else value
                if field == b"data":
                    data.append(value)
                elif field == b"event":
                    name = value
    if data and not stream.done:
        stream.event(name, b"\n".join(data))
    return stream.reply()
