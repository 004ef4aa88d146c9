"""The one LLM client all three stages share.

One `AsyncOpenAI` client per configured endpoint, carrying that endpoint's timeout and
`max_retries` (the SDK retries connection errors, 408, 409, 429 and 5xx with backoff and
Retry-After; nothing here retries on top of it), and a semaphore that keeps at most
`concurrency` requests in flight to that server. Every reply is reduced to clean text
or an `LLMError` whose message is one readable line.
"""
from __future__ import annotations

import asyncio
import email.utils
import ipaddress
import json
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import urlsplit

import httpx2
import openai

from config import Config, EndpointConfig, StageConfig
from guards import Guards, Trip

THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
THINK_UNOPENED = re.compile(r"^.*?</think>", re.DOTALL | re.IGNORECASE)

SERVER_HINTS = (
    "start your server, for example: LM Studio: Developer tab > Start Server (http://localhost:1234/v1); "
    "Ollama: `ollama serve` (http://localhost:11434/v1); vLLM: `vllm serve MODEL` (http://localhost:8000/v1); "
    "llama.cpp: `llama-server -m model.gguf --port 8080` (http://localhost:8080/v1)"
)


_SECRETS: set = set()


def register_secret(value: str) -> None:
    if value and len(value) >= 4:
        _SECRETS.add(value)


def redact(text: str) -> str:
    """`text` with every configured API key replaced: keys never reach logs or files."""
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


class LLMError(Exception):
    """A request that did not produce usable text; str() is one line for the user."""

    def __init__(self, message: str, kind: str = "error", attempts: int = 1):
        super().__init__(redact(message))
        self.kind = kind
        self.attempts = attempts


class ServerUnreachable(LLMError):
    pass


class ServerDown(LLMError):
    """Every request to an endpoint has failed to connect for `down_after` seconds: stop the run."""


@dataclass
class StageUsage:
    requests: int = 0
    retries: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Reply:
    text: str
    finish_reason: Optional[str]


class _Fault(Exception):
    """One failed attempt, classified: `kind` for the records, whether a retry may help."""

    def __init__(self, kind: str, message: str, retryable: bool, retry_after: Optional[float] = None):
        super().__init__(message)
        self.kind = kind
        self.retryable = retryable
        self.retry_after = retry_after


RETRYABLE_STATUS = {408, 409, 429}
MAX_RETRY_AFTER = 120.0


def clean_reply(text: str) -> str:
    """The answer without reasoning: `<think>` blocks (also with the opening tag missing)."""
    text = THINK_BLOCK.sub("", text)
    if "</think>" in text.lower():
        text = THINK_UNOPENED.sub("", text)
    return text.strip()


def error_message(exc: BaseException) -> str:
    """One line from any server's error shape (OpenAI, LM Studio, vLLM, llama.cpp, Gemini)."""
    if isinstance(exc, openai.APIStatusError):
        detail = _message_from_body(exc.body) or exc.message
        return f"HTTP {exc.status_code}: {_one_line(detail)}"
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc
        return f"connection failed ({_one_line(str(cause)) or type(cause).__name__})"
    if isinstance(exc, openai.APIError):
        return _one_line(_message_from_body(exc.body) or exc.message)
    return _one_line(str(exc)) or type(exc).__name__


NO_VISION = re.compile(r"not a multimodal model|image input is not supported|does not support images?|"
                       r"support image input|model does not support (?:image|vision)|vision is not supported|"
                       r"mmproj", re.IGNORECASE)
CONTEXT_OVERFLOW = re.compile(r"maximum context length|exceed_context_size|exceeds? the (?:available )?context|"
                              r"context_length_exceeded|context length|context window|prompt is too long|"
                              r"too many tokens|n_ctx", re.IGNORECASE)


def classify(exc: BaseException) -> _Fault:
    message = error_message(exc)
    if isinstance(exc, openai.APIStatusError) and exc.status_code in (400, 404, 413, 422, 500):
        # Answers that will be the same for every retry, whatever the status says.
        if NO_VISION.search(message):
            return _Fault("no_vision", message, False)
        if CONTEXT_OVERFLOW.search(message) or exc.status_code == 413:
            return _Fault("context_overflow", message, False)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status in RETRYABLE_STATUS or status >= 500
        return _Fault(f"http_{status}", message, retryable, _retry_after(exc.response.headers))
    if isinstance(exc, openai.APITimeoutError):
        return _Fault("timeout", message, True)
    if isinstance(exc, (openai.APIConnectionError, httpx2.TransportError)):
        return _Fault("connection", message, True)
    if isinstance(exc, openai.APIResponseValidationError) or isinstance(exc, ValueError):
        return _Fault("malformed_reply", f"malformed reply ({message})", True)
    if isinstance(exc, openai.APIError):  # an error object inside a 200 stream
        return _Fault("stream_error", f"error in the reply stream: {message}", True)
    return _Fault("error", message, False)


def _retry_after(headers) -> Optional[float]:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return min(max(float(value) * scale, 0.0), MAX_RETRY_AFTER)
        except ValueError:
            try:
                moment = email.utils.parsedate_to_datetime(value).timestamp()
                return min(max(moment - time.time(), 0.0), MAX_RETRY_AFTER)
            except (TypeError, ValueError):
                return None
    return None


def _message_from_body(body: Any) -> Optional[str]:
    if isinstance(body, list) and body:
        body = body[0]
    if isinstance(body, str):
        try:
            return _message_from_body(json.loads(body))
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


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Endpoint:
    """One server: its client, its concurrency limit, and the one retry loop for its requests.

    The SDK's own retries are turned off so that every retry, including those for faults
    the SDK does not retry (a stream cut in the middle, malformed JSON, an empty `choices`,
    an error object inside a 200 stream), goes through the same loop and is counted.
    """

    def __init__(self, name: str, config: EndpointConfig):
        self.name = name
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        register_secret(config.api_key)
        # A system proxy must not intercept a server on this machine (a classic mysterious 502).
        http_client = openai.DefaultAsyncHttpxClient(trust_env=False) if is_loopback(self.base_url) else None
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=config.api_key or "no-key",
            timeout=config.timeout,
            max_retries=0,
            http_client=http_client,
        )
        self.slots = asyncio.Semaphore(config.concurrency)
        self._failing_since: Optional[float] = None

    def describe(self) -> str:
        return f"endpoint '{self.name}' ({self.base_url})"

    async def list_models(self, timeout: float = 10.0) -> List[str]:
        """Model ids from `/models`; raises ServerUnreachable when nothing answers."""
        try:
            page = await self.client.with_options(timeout=timeout).models.list()
        except openai.APIConnectionError as exc:
            raise ServerUnreachable(f"cannot reach {self.describe()}: {error_message(exc)}. {SERVER_HINTS}") from None
        except openai.AuthenticationError as exc:
            raise ServerUnreachable(f"{self.describe()} refused the API key: {error_message(exc)}. "
                                    f"Set endpoints.{self.name}.api_key") from None
        return [model.id for model in page.data]

    async def chat(self, params: Dict[str, Any], usage: "StageUsage") -> tuple[Reply, Any]:
        """Send a chat request, retrying transient faults with backoff and jitter."""
        attempt = 0
        while True:
            attempt += 1
            usage.requests += 1
            try:
                async with self.slots:
                    result = await self._attempt(params)
                self._failing_since = None
                return result
            except Exception as exc:  # classified below: anything the server or transport can throw
                fault = exc if isinstance(exc, _Fault) else classify(exc)
            self._note_failure(fault)
            if not fault.retryable or attempt > self.config.max_retries:
                tried = f" after {attempt} attempts" if attempt > 1 else ""
                raise LLMError(f"{self.describe()}: {fault}{tried}", fault.kind, attempt)
            usage.retries += 1
            await asyncio.sleep(self._backoff(attempt, fault.retry_after))

    def _note_failure(self, fault: _Fault) -> None:
        if fault.kind not in ("connection", "timeout"):
            self._failing_since = None  # the server answered: it is up
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.config.down_after:
            raise ServerDown(f"{self.describe()} has not answered for {now - self._failing_since:.0f} s "
                             f"({fault}); stopping. {SERVER_HINTS}", fault.kind)

    def _backoff(self, attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            return retry_after
        ceiling = min(self.config.retry_max_backoff, self.config.retry_backoff * 2 ** (attempt - 1))
        return ceiling * random.uniform(0.5, 1.0)

    async def _attempt(self, params: Dict[str, Any]) -> tuple[Reply, Any]:
        if self.config.stream:
            return await self._chat_streamed(params)
        completion = await self.client.chat.completions.create(**params)
        if not hasattr(completion, "choices"):  # e.g. an HTML page served with status 200
            raise _Fault("malformed_reply", f"malformed reply (not a chat completion: {_one_line(str(completion), 80)})",
                         True)
        error = getattr(completion, "error", None)
        if error:
            raise _Fault("reply_error", f"error in the reply: {_message_from_body({'error': error}) or error}", True)
        if not completion.choices:
            raise _Fault("empty_choices", "reply had no choices", True)
        choice = completion.choices[0]
        return Reply(choice.message.content or "", choice.finish_reason), completion.usage

    async def _chat_streamed(self, params: Dict[str, Any]) -> tuple[Reply, Any]:
        options = {"stream_options": {"include_usage": True}} if self.config.stream_usage else {}
        stream = await self.client.chat.completions.create(**params, stream=True, **options)
        parts: List[str] = []
        finish_reason = usage = None
        saw_choice = False
        async for chunk in stream:
            if not hasattr(chunk, "choices"):
                raise _Fault("malformed_reply", "malformed reply stream", True)
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices or ():
                saw_choice = True
                if choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
                if choice.finish_reason:
                    finish_reason = choice.finish_reason
        if not saw_choice:
            raise _Fault("empty_choices", "reply stream had no choices", True)
        if finish_reason is None:
            raise _Fault("stream_cut", "reply stream ended before the model finished", True)
        if finish_reason == "error":
            raise _Fault("stream_error", "the server reported an error inside the reply stream", True)
        return Reply("".join(parts), finish_reason), usage


@dataclass
class LLM:
    """All endpoints of a run, the quality guards, and the request and token counts per stage."""

    endpoints: Dict[str, Endpoint]
    guards: Optional[Guards] = None
    usage: Dict[str, StageUsage] = field(default_factory=lambda: defaultdict(StageUsage))

    @classmethod
    def from_config(cls, config: Config) -> "LLM":
        return cls({name: Endpoint(name, ep) for name, ep in config.endpoints.items()}, Guards(config.guards))

    def _params(self, endpoint: Endpoint, settings: StageConfig) -> Dict[str, Any]:
        params: Dict[str, Any] = {"model": settings.model}
        for name in ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty"):
            if getattr(settings, name) is not None:
                params[name] = getattr(settings, name)
        if settings.extra_body:
            params["extra_body"] = dict(settings.extra_body)
        return params

    async def complete(self, stage: str, settings: StageConfig, messages: List[Dict[str, Any]],
                       clean: Optional[Callable[[str], str]] = None, final: bool = False) -> str:
        """Ask `stage`'s model and return its cleaned answer; a reply that trips a quality
        guard is asked again (fresh, with a corrective turn, or with twice the token limit)
        up to guards.max_attempts times."""
        endpoint = self.endpoints[settings.endpoint]
        params = self._params(endpoint, settings)
        stats = self.usage[stage]
        max_tokens = settings.max_tokens
        attempts = self.guards.settings.max_attempts if self.guards else 1
        conversation = list(messages)
        trip = None
        for attempt in range(1, attempts + 1):
            params.update(messages=conversation, **{endpoint.config.token_limit_param: max_tokens})
            reply, usage = await endpoint.chat(params, stats)
            if usage:
                stats.prompt_tokens += usage.prompt_tokens or 0
                stats.completion_tokens += usage.completion_tokens or 0
            text = clean_reply(reply.text)
            if clean is not None and reply.finish_reason != "length":
                text = clean(text)
            trip = self.guards.check(text, reply.finish_reason, final) if self.guards else \
                _basic_check(text, reply.finish_reason)
            if trip is None:
                return text
            if trip.retry == "more_tokens":
                if max_tokens > settings.max_tokens:
                    break
                max_tokens *= 2
                conversation = list(messages)
            elif trip.retry == "corrective" and trip.correction:
                conversation = list(messages) + [{"role": "assistant", "content": reply.text},
                                                 {"role": "user", "content": trip.correction}]
            else:
                conversation = list(messages)
        tried = f" (after {attempt} attempts)" if attempt > 1 else ""
        detail = f"{trip.reason} at {max_tokens} tokens (raise {stage}.max_tokens)" if trip.guard == "truncated" \
            else f"{trip.reason} from model '{settings.model}'"
        raise LLMError(f"{endpoint.describe()}: {detail}{tried}", f"guard_{trip.guard}", attempt)

    async def close(self) -> None:
        await asyncio.gather(*(ep.client.close() for ep in self.endpoints.values()), return_exceptions=True)


def _basic_check(text: str, finish_reason: Optional[str]) -> Optional[Trip]:
    if finish_reason == "length":
        return Trip("truncated", "reply cut off at max_tokens", "more_tokens")
    return None if text.strip() else Trip("empty", "empty reply")
