"""The one LLM client all three stages share.

One `AsyncOpenAI` client per configured endpoint, carrying that endpoint's timeout and
`max_retries` (the SDK retries connection errors, 408, 409, 429 and 5xx with backoff and
Retry-After; nothing here retries on top of it), and a semaphore that keeps at most
`concurrency` requests in flight to that server. Every reply is reduced to clean text
or an `LLMError` whose message is one readable line.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

import openai

from config import Config, EndpointConfig, StageConfig

THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
THINK_UNOPENED = re.compile(r"^.*?</think>", re.DOTALL | re.IGNORECASE)

SERVER_HINTS = (
    "start your server, for example: LM Studio: Developer tab > Start Server (http://localhost:1234/v1); "
    "Ollama: `ollama serve` (http://localhost:11434/v1); vLLM: `vllm serve MODEL` (http://localhost:8000/v1); "
    "llama.cpp: `llama-server -m model.gguf --port 8080` (http://localhost:8080/v1)"
)


class LLMError(Exception):
    """A request that did not produce usable text; str() is one line for the user."""


class ServerUnreachable(LLMError):
    pass


@dataclass
class StageUsage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Reply:
    text: str
    finish_reason: Optional[str]


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
    def __init__(self, name: str, config: EndpointConfig):
        self.name = name
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        # A system proxy must not intercept a server on this machine (a classic mysterious 502).
        http_client = openai.DefaultAsyncHttpxClient(trust_env=False) if is_loopback(self.base_url) else None
        self.client = openai.AsyncOpenAI(
            base_url=self.base_url,
            api_key=config.api_key or "no-key",
            timeout=config.timeout,
            max_retries=config.max_retries,
            http_client=http_client,
        )
        self.slots = asyncio.Semaphore(config.concurrency)

    def describe(self) -> str:
        return f"endpoint '{self.name}' ({self.base_url})"

    async def list_models(self, timeout: float = 10.0) -> List[str]:
        """Model ids from `/models`; raises ServerUnreachable when nothing answers."""
        try:
            page = await self.client.with_options(max_retries=0, timeout=timeout).models.list()
        except openai.APIConnectionError as exc:
            raise ServerUnreachable(f"cannot reach {self.describe()}: {error_message(exc)}. {SERVER_HINTS}") from None
        except openai.AuthenticationError as exc:
            raise ServerUnreachable(f"{self.describe()} refused the API key: {error_message(exc)}. "
                                    f"Set endpoints.{self.name}.api_key") from None
        return [model.id for model in page.data]

    async def chat(self, params: Dict[str, Any]) -> tuple[Reply, Any]:
        async with self.slots:
            try:
                if self.config.stream:
                    return await self._chat_streamed(params)
                completion = await self.client.chat.completions.create(**params)
            except openai.OpenAIError as exc:
                raise LLMError(f"{self.describe()}: {error_message(exc)}") from None
        if not completion.choices:
            raise LLMError(f"{self.describe()}: reply had no choices")
        choice = completion.choices[0]
        return Reply(choice.message.content or "", choice.finish_reason), completion.usage

    async def _chat_streamed(self, params: Dict[str, Any]) -> tuple[Reply, Any]:
        stream = await self.client.chat.completions.create(
            **params, stream=True, stream_options={"include_usage": True})
        parts: List[str] = []
        finish_reason = usage = None
        async for chunk in stream:
            if chunk.usage:
                usage = chunk.usage
            for choice in chunk.choices or ():
                if choice.delta and choice.delta.content:
                    parts.append(choice.delta.content)
                if choice.finish_reason:
                    finish_reason = choice.finish_reason
        return Reply("".join(parts), finish_reason), usage


@dataclass
class LLM:
    """All endpoints of a run, and the request and token counts per stage."""

    endpoints: Dict[str, Endpoint]
    usage: Dict[str, StageUsage] = field(default_factory=lambda: defaultdict(StageUsage))

    @classmethod
    def from_config(cls, config: Config) -> "LLM":
        return cls({name: Endpoint(name, ep) for name, ep in config.endpoints.items()})

    async def complete(self, stage: str, settings: StageConfig, messages: List[Dict[str, Any]]) -> str:
        """Send one chat request for `stage` and return the cleaned answer text."""
        endpoint = self.endpoints[settings.endpoint]
        params: Dict[str, Any] = {"model": settings.model, "messages": messages,
                                  "max_tokens": settings.max_tokens}
        if settings.temperature is not None:
            params["temperature"] = settings.temperature
        if settings.top_p is not None:
            params["top_p"] = settings.top_p
        stats = self.usage[stage]
        stats.requests += 1
        reply, usage = await endpoint.chat(params)
        if usage:
            stats.prompt_tokens += usage.prompt_tokens or 0
            stats.completion_tokens += usage.completion_tokens or 0
        if reply.finish_reason == "length":
            raise LLMError(f"{endpoint.describe()}: reply cut off at max_tokens={settings.max_tokens} "
                           f"(raise {stage}.max_tokens)")
        text = clean_reply(reply.text)
        if not text:
            raise LLMError(f"{endpoint.describe()}: empty reply from model '{settings.model}'")
        return text

    async def close(self) -> None:
        await asyncio.gather(*(ep.client.close() for ep in self.endpoints.values()), return_exceptions=True)
