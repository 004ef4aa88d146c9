"""Reading what a server sent back: the answer's text, or what went wrong in one line.

Servers disagree on the shape of an error (OpenAI, LM Studio, vLLM, llama.cpp and Gemini
each nest the message differently) and on the words for "this model cannot see" or "the
prompt is too long"; those are recognised here so that the retry loop can tell a fault
another request may cure from one it would only repeat.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any, Optional

import httpx2

from tagcaption.errors import Kind
from tagcaption.retry import is_retryable, parse_retry_after
from tagcaption.sinks import redact, shorten

THINK_OPEN = re.compile(r"<think>", re.IGNORECASE)
THINK_CLOSE = re.compile(r"</think>", re.IGNORECASE)

NO_VISION = re.compile(r"not a multimodal model|image input is not supported|does not support images?|"
                       r"support image input|model does not support (?:image|vision)|vision is not supported|"
                       r"mmproj", re.IGNORECASE)
CONTEXT_OVERFLOW = re.compile(r"maximum context length|exceed_context_size|exceeds? the (?:available )?context|"
                              r"context_length_exceeded|context length|context window|prompt is too long|"
                              r"too many tokens|n_ctx", re.IGNORECASE)
FINAL_STATUSES = (400, 404, 413, 422, 500)
"""Statuses under which servers report no vision or a context overflow (llama.cpp says 500)."""


class Fault(Exception):
    """One failed attempt, classified: its kind (and status) for the records, whether a
    retry may help, how long the server asked to wait, and whether the server could not
    be reached at all (`unreachable`: what `stop_after_failures` counts)."""

    def __init__(self, kind: Kind, message: str, status: Optional[int] = None,
                 retry_after: Optional[float] = None, unreachable: bool = False):
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.retryable = is_retryable(kind, status)
        self.retry_after = retry_after
        self.unreachable = unreachable


def clean_reply(text: str) -> str:
    """The answer without reasoning: `<think>` blocks, then everything up to a `</think>`
    whose opening tag is missing. Found tag by tag, each search starting where the last one
    ended, so a reply of unclosed `<think>`s costs one pass, not one per tag."""
    kept, position = [], 0
    while True:
        opening = THINK_OPEN.search(text, position)
        closing = THINK_CLOSE.search(text, opening.end()) if opening else None
        if closing is None:
            break
        kept.append(text[position:opening.start()])
        position = closing.end()
    text = "".join(kept) + text[position:]
    unopened = THINK_CLOSE.search(text)
    return (text[unopened.end():] if unopened else text).strip()


def _sdk():
    """The OpenAI SDK if it is loaded: only `check` uses it, and when it is not loaded no
    exception can be one of its (a run never imports it: a quarter of a second)."""
    return sys.modules.get("openai")


def error_message(exc: BaseException) -> str:
    """One line from any server's error shape (OpenAI, LM Studio, vLLM, llama.cpp, Gemini)."""
    sdk = _sdk()
    if sdk and isinstance(exc, sdk.APIStatusError):
        detail = message_from_body(exc.body) or exc.message
        return f"HTTP {exc.status_code}: {one_line(detail)}"
    if isinstance(exc, httpx2.TimeoutException) or (sdk and isinstance(exc, sdk.APITimeoutError)):
        return "request timed out"
    if isinstance(exc, httpx2.TransportError) or (sdk and isinstance(exc, sdk.APIConnectionError)):
        cause = exc if isinstance(exc, httpx2.TransportError) else exc.__cause__ or exc
        return f"connection failed ({one_line(str(cause)) or type(cause).__name__})"
    if sdk and isinstance(exc, sdk.APIError):
        return one_line(message_from_body(exc.body) or exc.message)
    return one_line(str(exc)) or type(exc).__name__


def classify(exc: BaseException) -> Fault:
    """The fault behind anything a request can raise (httpx2's errors, or the SDK's)."""
    if isinstance(exc, httpx2.TooManyRedirects):
        return Fault(Kind.ERROR, "the server sends the request round in redirects (is base_url right?)")
    message = error_message(exc)
    sdk = _sdk()
    if sdk and isinstance(exc, sdk.APIStatusError):
        return status_fault(exc.status_code, message, parse_retry_after(exc.response.headers))
    if isinstance(exc, httpx2.TimeoutException) or (sdk and isinstance(exc, sdk.APITimeoutError)):
        return Fault(Kind.TIMEOUT, message, unreachable=isinstance(exc, httpx2.ConnectTimeout))
    if isinstance(exc, httpx2.TransportError) or (sdk and isinstance(exc, sdk.APIConnectionError)):
        cause = exc if isinstance(exc, httpx2.TransportError) else exc.__cause__
        return Fault(Kind.CONNECTION, message, unreachable=isinstance(cause, (httpx2.ConnectError,
                                                                                httpx2.ConnectTimeout)))
    if isinstance(exc, ValueError) or (sdk and isinstance(exc, sdk.APIResponseValidationError)):
        return Fault(Kind.MALFORMED_REPLY, f"malformed reply ({message})")
    if sdk and isinstance(exc, sdk.APIError):  # an error object inside a 200 stream
        return Fault(Kind.STREAM_ERROR, f"error in the reply stream: {message}")
    return Fault(Kind.ERROR, message)


def status_fault(status: int, message: str, retry_after: Optional[float] = None) -> Fault:
    """The fault of an HTTP error answer; `message` is its one line (`HTTP 400: …`)."""
    if status in FINAL_STATUSES:
        # Answers that will be the same for every retry, whatever the status says.
        if NO_VISION.search(message):
            return Fault(Kind.NO_VISION, message)
        if CONTEXT_OVERFLOW.search(message) or status == 413:
            return Fault(Kind.CONTEXT_OVERFLOW, message)
    return Fault(Kind.HTTP, message, status, retry_after)


def status_message(status: int, body: str, reason: str = "") -> str:
    """`HTTP 502: Bad Gateway` from an error answer's status and body, in any server's shape."""
    detail = message_from_body(body) if body.strip() else None
    return f"HTTP {status}: {one_line(detail or body or reason or 'no message')}"


def message_from_body(body: Any) -> Optional[str]:
    if isinstance(body, list) and body:
        body = body[0]
    if isinstance(body, str):
        try:
            return message_from_body(json.loads(body))
        except ValueError:
            return body
    if not isinstance(body, dict):
        return None
    error = body.get("error", body)
    if isinstance(error, str):
        return error
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(body.get("message"), str):
        return body["message"]
    return None


def content_text(content: Any) -> str:
    """Reply content as text: a string, or a list of parts as some servers send it."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def one_line(text: str, limit: int = 300) -> str:
    """`text` on one line of at most `limit` characters, every configured key masked before
    it is cut (sinks.shorten): a cut through a key would keep the piece before it."""
    return shorten(" ".join(redact(str(text)).split()), limit)


def token_count(usage: object, key: str) -> int:
    """A token count from a reply's `usage`; a malformed one counts 0 rather than costing the caption."""
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) else 0


def prompt_detail(usage: object, key: str) -> int:
    """`image_tokens` or `cached_tokens` of a reply's `usage.prompt_tokens_details` (OpenAI's
    shape, which vLLM and llama.cpp follow), or for cached tokens llama.cpp's `timings.cache_n`;
    0 where the server does not report it."""
    details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
    value = token_count(details, key)
    if not value and key == "cached_tokens" and isinstance(usage, dict):
        value = token_count(usage.get("timings"), "cache_n")
    return value
