"""One configured endpoint: its servers, how many requests each may carry, and the one
retry loop every request goes through.

The SDK's own retries are turned off (`max_retries=0`) so that every retry, including
those for faults the SDK does not retry (a stream cut in the middle, malformed JSON, an
empty `choices`, an error object inside a 200 stream), goes through `RetryPolicy` and is
counted. Each attempt goes to the replica with the fewest requests in flight; a replica
that fails `rest_after` times in a row rests for `rest_seconds` while the others carry on.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional
from urllib.parse import urlsplit

import httpx2
import openai

from tagcaption import tls
from tagcaption.config import EndpointConfig
from tagcaption.deadlines import MODELS_SECONDS
from tagcaption.errors import Kind, LLMError, NoVision, ServerDown, ServerUnreachable
from tagcaption.replies import Fault, classify, content_text, error_message, message_from_body, one_line
from tagcaption.retry import RetryPolicy
from tagcaption.sinks import redact, register_secret

log = logging.getLogger("caption")

SERVER_HINTS = (
    "start your server, for example: LM Studio: Developer tab > Start Server (http://localhost:1234/v1); "
    "Ollama: `ollama serve` (http://localhost:11434/v1); vLLM: `vllm serve MODEL` (http://localhost:8000/v1); "
    "llama.cpp: `llama-server -m model.gguf --port 8080` (http://localhost:8080/v1)"
)
TLS_HINT = ("the server's TLS certificate is not trusted: set SSL_CERT_FILE to a PEM file holding it "
            "(or the authority that signed it)")

Count = Callable[[str, int], None]
"""Hears `("requests", 1)` before each attempt and `("retries", 1)` before each retry."""


@dataclass
class Reply:
    text: str
    finish_reason: Optional[str]


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
    the retry loop for its requests."""

    def __init__(self, name: str, config: EndpointConfig):
        self.name = name
        self.config = config
        urls = [config.base_url] if isinstance(config.base_url, str) else list(config.base_url)
        self.replicas = [Replica(url, config) for url in urls]
        self.base_url = self.replicas[0].base_url
        register_secret(config.api_key)
        self.policy = RetryPolicy(config.max_retries, config.retry_backoff, config.retry_max_backoff)
        self.slots = asyncio.Semaphore(config.concurrency * len(self.replicas))
        self._freed = asyncio.Condition()
        self._failing_since: Optional[float] = None

    def describe(self, replica: Optional[Replica] = None) -> str:
        return f"endpoint '{self.name}' ({(replica or self.replicas[0]).base_url})"

    async def list_models(self, timeout: float = MODELS_SECONDS) -> List[str]:
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
                raise ServerUnreachable(redact(f"{self.describe(replica)} refused the API key: "
                                               f"{error_message(exc)}. Set endpoints.{self.name}.api_key")) from None
            listed += [model.id for model in page.data]
        if len(unreachable) == len(self.replicas):
            hint = TLS_HINT if any("CERTIFICATE_VERIFY_FAILED" in line for line in unreachable) else SERVER_HINTS
            raise ServerUnreachable(redact(f"{'; '.join(unreachable)}. {hint}"))
        for line in unreachable:
            log.warning("warning: %s; resting it, the other replicas carry on", line)
        return listed

    async def chat(self, params: Dict[str, Any], count: Count) -> tuple[Reply, Any]:
        """Send a chat request, retrying transient faults as `self.policy` says."""
        attempt = 0
        while True:
            attempt += 1
            count("requests", 1)
            async with self.slots:
                replica = await self._take_replica()
                try:
                    result = await self._attempt(replica, params)
                except Exception as exc:  # classified below: anything the server or transport can throw
                    fault = exc if isinstance(exc, Fault) else classify(exc)
                else:
                    replica.failures = 0
                    self._failing_since = None
                    return result
                finally:
                    await self._give_back(replica)
            self._note_replica_failure(replica, fault)
            self._note_failure(fault, attempt)
            if not self.policy.should_retry(attempt, fault.retryable):
                raise _final_error(f"{self.describe(replica)}: {fault}", fault, attempt)
            count("retries", 1)
            await asyncio.sleep(self.policy.delay(attempt, fault.retry_after))

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

    def _note_replica_failure(self, replica: Replica, fault: Fault) -> None:
        if not fault.retryable or len(self.replicas) == 1:
            return
        replica.failures += 1
        if replica.failures >= self.config.rest_after and replica.rested_until <= time.monotonic():
            replica.rested_until = time.monotonic() + self.config.rest_seconds
            log.warning("warning: %s failed %d times in a row (%s); resting it for %.0f s",
                        self.describe(replica), replica.failures, redact(str(fault)), self.config.rest_seconds)
            replica.failures = 0

    def _note_failure(self, fault: Fault, attempt: int) -> None:
        """Raise ServerDown once every request has failed to connect for `down_after` seconds."""
        if fault.kind not in (Kind.CONNECTION, Kind.TIMEOUT):
            self._failing_since = None  # the server answered: it is up
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.config.down_after:
            raise ServerDown(redact(f"{self.describe()} has not answered for {now - self._failing_since:.0f} s "
                                    f"({fault}); stopping. {SERVER_HINTS}"), attempt)

    async def _attempt(self, replica: Replica, params: Dict[str, Any]) -> tuple[Reply, dict]:
        """One request. The SDK's generic `post` is used with plain dicts: building typed
        objects for every request and stream chunk costs more CPU than the rest of a run."""
        if self.config.stream:
            return await self._chat_streamed(replica, params)
        response = await replica.client.post("/chat/completions", cast_to=httpx2.Response, body=params)
        try:
            completion = response.json()
        except ValueError:
            raise Fault(Kind.MALFORMED_REPLY, f"malformed reply (not JSON: {one_line(response.text, 80)})") from None
        if not isinstance(completion, dict):
            raise Fault(Kind.MALFORMED_REPLY, f"malformed reply ({one_line(str(completion), 80)})")
        if completion.get("error"):
            raise Fault(Kind.REPLY_ERROR, f"error in the reply: {message_from_body(completion)}")
        choices = completion.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise Fault(Kind.EMPTY_CHOICES, "reply had no choices")
        message = choices[0].get("message") or {}
        return Reply(content_text(message.get("content")), choices[0].get("finish_reason")), \
            completion.get("usage") or {}

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
                raise Fault(Kind.MALFORMED_REPLY, "malformed reply stream")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                saw_choice = True
                content = content_text((choice.get("delta") or {}).get("content"))
                if content:
                    parts.append(content)
                finish_reason = choice.get("finish_reason") or finish_reason
        if not saw_choice:
            raise Fault(Kind.EMPTY_CHOICES, "reply stream had no choices")
        if finish_reason is None:
            raise Fault(Kind.STREAM_CUT, "reply stream ended before the model finished")
        if finish_reason == "error":
            raise Fault(Kind.STREAM_ERROR, "the server reported an error inside the reply stream")
        return Reply("".join(parts), finish_reason), usage


def _final_error(where: str, fault: Fault, attempts: int) -> LLMError:
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    message = redact(f"{where}{tried}")
    if fault.kind is Kind.NO_VISION:
        return NoVision(message, attempts)
    return LLMError(message, fault.kind, attempts, status=fault.status)
