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
import logging
import random
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import urlsplit

import httpx2
import openai

from tagcaption import tls
from tagcaption.config import Config, EndpointConfig, StageConfig
from tagcaption.guards import Guards, Trip
from tagcaption.sinks import redact, register_secret

log = logging.getLogger("caption")

THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
THINK_UNOPENED = re.compile(r"^.*?</think>", re.DOTALL | re.IGNORECASE)

SERVER_HINTS = (
    "start your server, for example: LM Studio: Developer tab > Start Server (http://localhost:1234/v1); "
    "Ollama: `ollama serve` (http://localhost:11434/v1); vLLM: `vllm serve MODEL` (http://localhost:8000/v1); "
    "llama.cpp: `llama-server -m model.gguf --port 8080` (http://localhost:8080/v1)"
)
TLS_HINT = ("the server's TLS certificate is not trusted: set SSL_CERT_FILE to a PEM file holding it "
            "(or the authority that signed it)")


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


def _count(usage: object, key: str) -> int:
    """A token count from a reply's `usage`; a malformed one counts 0 rather than costing the caption."""
    value = usage.get(key) if isinstance(usage, dict) else None
    return value if isinstance(value, int) else 0


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


def _text(content: Any) -> str:
    """Reply content as text: a string, or a list of parts as some servers send it."""
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


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


class Replica:
    """One server behind an endpoint: its client, how busy it is, and whether it is resting."""

    def __init__(self, base_url: str, config: EndpointConfig):
        self.base_url = base_url.rstrip("/")
        # A system proxy must not intercept a server on this machine (a classic mysterious 502).
        http_client = openai.DefaultAsyncHttpxClient(trust_env=not is_loopback(self.base_url),
                                                     verify=tls.context_for(self.base_url))
        self.client = openai.AsyncOpenAI(base_url=self.base_url, api_key=config.api_key or "no-key",
                                         timeout=config.timeout, max_retries=0, http_client=http_client)
        self.in_flight = 0
        self.failures = 0
        self.rested_until = 0.0


class Endpoint:
    """One named endpoint: one server or several replicas of it, a concurrency limit, and
    the one retry loop for its requests.

    The SDK's own retries are turned off so that every retry, including those for faults
    the SDK does not retry (a stream cut in the middle, malformed JSON, an empty `choices`,
    an error object inside a 200 stream), goes through the same loop and is counted. Each
    attempt goes to the replica with the fewest requests in flight; a replica that fails
    `rest_after` times in a row rests for `rest_seconds` while the others carry on.
    """

    def __init__(self, name: str, config: EndpointConfig):
        self.name = name
        self.config = config
        urls = [config.base_url] if isinstance(config.base_url, str) else list(config.base_url)
        self.replicas = [Replica(url, config) for url in urls]
        self.base_url = self.replicas[0].base_url
        register_secret(config.api_key)
        self.slots = asyncio.Semaphore(config.concurrency * len(self.replicas))
        self._freed = asyncio.Condition()
        self._failing_since: Optional[float] = None

    def describe(self, replica: Optional[Replica] = None) -> str:
        return f"endpoint '{self.name}' ({(replica or self.replicas[0]).base_url})"

    async def list_models(self, timeout: float = 10.0) -> List[str]:
        """Model ids from `/models`; raises ServerUnreachable when no replica answers."""
        listed: List[str] = []
        unreachable = []
        for replica in self.replicas:
            try:
                page = await replica.client.with_options(timeout=timeout).models.list()
            except openai.APIConnectionError as exc:
                unreachable.append(f"cannot reach {self.describe(replica)}: {error_message(exc)}")
                replica.rested_until = time.monotonic() + self.config.rest_seconds
                continue
            except openai.AuthenticationError as exc:
                raise ServerUnreachable(f"{self.describe(replica)} refused the API key: {error_message(exc)}. "
                                        f"Set endpoints.{self.name}.api_key") from None
            listed += [model.id for model in page.data]
        if len(unreachable) == len(self.replicas):
            hint = TLS_HINT if any("CERTIFICATE_VERIFY_FAILED" in line for line in unreachable) else SERVER_HINTS
            raise ServerUnreachable(f"{'; '.join(unreachable)}. {hint}")
        for line in unreachable:
            log.warning("warning: %s; resting it, the other replicas carry on", line)
        return listed

    async def _take_replica(self) -> Replica:
        """The least busy replica that has a free slot (a resting replica's share is not
        piled onto the others: its slots wait instead)."""
        async with self._freed:
            while True:
                replica = self._pick()
                if replica.in_flight < self.config.concurrency:
                    replica.in_flight += 1
                    return replica
                await self._freed.wait()

    async def _give_back(self, replica: Replica) -> None:
        async with self._freed:
            replica.in_flight -= 1
            self._freed.notify()

    def _pick(self) -> Replica:
        now = time.monotonic()
        ready = [replica for replica in self.replicas if replica.rested_until <= now]
        if not ready:
            return min(self.replicas, key=lambda replica: replica.rested_until)
        return min(ready, key=lambda replica: replica.in_flight)

    async def chat(self, params: Dict[str, Any], usage: "StageUsage") -> tuple[Reply, Any]:
        """Send a chat request, retrying transient faults with backoff and jitter."""
        attempt = 0
        while True:
            attempt += 1
            usage.requests += 1
            async with self.slots:
                replica = await self._take_replica()
                try:
                    result = await self._attempt(replica, params)
                except Exception as exc:  # classified below: anything the server or transport can throw
                    fault = exc if isinstance(exc, _Fault) else classify(exc)
                else:
                    replica.failures = 0
                    self._failing_since = None
                    return result
                finally:
                    await self._give_back(replica)
            self._note_replica_failure(replica, fault)
            self._note_failure(fault)
            if not fault.retryable or attempt > self.config.max_retries:
                tried = f" after {attempt} attempts" if attempt > 1 else ""
                raise LLMError(f"{self.describe(replica)}: {fault}{tried}", fault.kind, attempt)
            usage.retries += 1
            await asyncio.sleep(self._backoff(attempt, fault.retry_after))

    def _note_replica_failure(self, replica: Replica, fault: _Fault) -> None:
        if not fault.retryable or len(self.replicas) == 1:
            return
        replica.failures += 1
        if replica.failures >= self.config.rest_after and replica.rested_until <= time.monotonic():
            replica.rested_until = time.monotonic() + self.config.rest_seconds
            log.warning("warning: %s failed %d times in a row (%s); resting it for %.0f s",
                        self.describe(replica), replica.failures, fault, self.config.rest_seconds)
            replica.failures = 0

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

    async def _attempt(self, replica: Replica, params: Dict[str, Any]) -> tuple[Reply, dict]:
        """One request. The SDK's generic `post` is used with plain dicts: building typed
        objects for every request and stream chunk costs more CPU than the rest of a run."""
        if self.config.stream:
            return await self._chat_streamed(replica, params)
        response = await replica.client.post("/chat/completions", cast_to=httpx2.Response, body=params)
        try:
            completion = response.json()
        except ValueError:
            raise _Fault("malformed_reply", f"malformed reply (not JSON: {_one_line(response.text, 80)})",
                         True) from None
        if not isinstance(completion, dict):
            raise _Fault("malformed_reply", f"malformed reply ({_one_line(str(completion), 80)})", True)
        if completion.get("error"):
            raise _Fault("reply_error", f"error in the reply: {_message_from_body(completion)}", True)
        choices = completion.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise _Fault("empty_choices", "reply had no choices", True)
        message = choices[0].get("message") or {}
        return Reply(_text(message.get("content")), choices[0].get("finish_reason")), completion.get("usage") or {}

    async def _chat_streamed(self, replica: Replica, params: Dict[str, Any]) -> tuple[Reply, dict]:
        body = dict(params, stream=True)
        if self.config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        stream = await replica.client.post("/chat/completions", cast_to=object, body=body, stream=True,
                                           stream_cls=openai.AsyncStream[object])
        parts: List[str] = []
        finish_reason = None
        usage: dict = {}
        saw_choice = False
        async for chunk in stream:
            if not isinstance(chunk, dict) or not isinstance(chunk.get("choices", []), list):
                raise _Fault("malformed_reply", "malformed reply stream", True)
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                saw_choice = True
                content = _text((choice.get("delta") or {}).get("content"))
                if content:
                    parts.append(content)
                finish_reason = choice.get("finish_reason") or finish_reason
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
        params.update(settings.extra_body)  # server-specific fields go into the body as they are
        return params

    async def complete(self, stage: str, settings: StageConfig, messages: List[Dict[str, Any]],
                       clean: Optional[Callable[[str], str]] = None, final: bool = False,
                       trips: Optional[List[str]] = None) -> str:
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
            stats.prompt_tokens += _count(usage, "prompt_tokens")
            stats.completion_tokens += _count(usage, "completion_tokens")
            text = clean_reply(reply.text)
            if clean is not None and reply.finish_reason != "length":
                text = clean(text)
            trip = self.guards.check(text, reply.finish_reason, final) if self.guards else \
                _basic_check(text, reply.finish_reason)
            if trip is None:
                return text
            if trips is not None:
                trips.append(trip.guard)
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
        await asyncio.gather(*(replica.client.close() for endpoint in self.endpoints.values()
                               for replica in endpoint.replicas), return_exceptions=True)


def _basic_check(text: str, finish_reason: Optional[str]) -> Optional[Trip]:
    if finish_reason == "length":
        return Trip("truncated", "reply cut off at max_tokens", "more_tokens")
    return None if text.strip() else Trip("empty", "empty reply")
