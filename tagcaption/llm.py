"""The one LLM client all three stages share.

`LLM` holds the endpoints of a run (see `endpoint.py`: one `AsyncOpenAI` client per
server with the SDK's own retries turned off, a concurrency limit, and the one retry loop
that follows `retry.RetryPolicy`), builds each stage's request parameters, and asks again
when a reply trips a quality guard. Every reply is reduced to clean text or an
`errors.LLMError` whose message is one readable line.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from tagcaption.config import Config, StageConfig
from tagcaption.deadlines import off_loop
from tagcaption.endpoint import Endpoint, Reply
from tagcaption.errors import GuardTripped
from tagcaption.guards import Guards, ReplyRejected, Trip, reminded
from tagcaption.replies import clean_reply, prompt_detail, token_count
from tagcaption.sinks import redact
from tagcaption.tally import Tally

PARAMETERS = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty")
"""Stage settings sent as they are when set."""
OFF_LOOP_CHARS = 20_000
"""A reply longer than this is cleaned and guarded in a thread, so the run goes on meanwhile;
a shorter one costs less than the hop."""


@dataclass
class LLM:
    """All endpoints of a run, the quality guards, and the tally that counts requests, retries,
    tokens and guard trips per stage."""

    endpoints: Dict[str, Endpoint]
    guards: Optional[Guards] = None
    tally: Tally = field(default_factory=Tally)

    @classmethod
    def from_config(cls, config: Config, tally: Optional[Tally] = None) -> "LLM":
        return cls({name: Endpoint(name, ep) for name, ep in config.endpoints.items()}, Guards(config.guards),
                   tally=tally if tally is not None else Tally())

    def _params(self, settings: StageConfig) -> Dict[str, Any]:
        params: Dict[str, Any] = {"model": settings.model}
        for name in PARAMETERS:
            if getattr(settings, name) is not None:
                params[name] = getattr(settings, name)
        params.update(settings.extra_body)  # server-specific fields go into the body as they are
        return params

    def _counter(self, stage: str) -> Callable[[str, int], None]:
        """Counts `requests`, `retries`, `prompt_tokens`, `completion_tokens`, and where the
        server reports them `image_tokens` and `cached_tokens` (both part of the prompt tokens)
        of `stage`."""
        def count(key: str, n: int) -> None:
            if n:
                self.tally.update(f"{key}.{stage}", n)
        return count

    async def chat(self, stage: str, settings: StageConfig, messages: List[Dict[str, Any]],
                   max_tokens: Optional[int] = None, body: Optional[Dict[str, Any]] = None) -> Reply:
        """One reply to `messages` as the model sent it (retried on transient faults, not guarded);
        `body`: fields of this request that the stage's settings do not hold (a variant's seed,
        a response_format)."""
        endpoint = self.endpoints[settings.endpoint]
        count = self._counter(stage)
        params = dict(self._params(settings), **(body or {}), messages=messages)
        params[endpoint.config.token_limit_param] = max_tokens or settings.max_tokens
        reply, usage = await endpoint.chat(params, count)
        count("prompt_tokens", token_count(usage, "prompt_tokens"))
        count("completion_tokens", token_count(usage, "completion_tokens"))
        count("image_tokens", prompt_detail(usage, "image_tokens"))
        count("cached_tokens", prompt_detail(usage, "cached_tokens"))
        return reply

    async def complete(self, stage: str, settings: StageConfig, messages: List[Dict[str, Any]],
                       clean: Optional[Callable[[str], str]] = None, final: bool = False,
                       trips: Optional[List[str]] = None, body: Optional[Dict[str, Any]] = None,
                       check: Optional[Callable[[str], Optional[Trip]]] = None) -> str:
        """Ask `stage`'s model and return its cleaned answer; a reply that trips a quality
        guard (or that `clean` rejects), or then the image's own `check` (faithfulness.py), is
        asked again (fresh, with a corrective turn, told what to fix, or with twice the token
        limit) up to guards.max_attempts times, then raises GuardTripped. `body`: fields added
        to the request (a seed, a response_format)."""
        max_tokens = settings.max_tokens
        attempts = self.guards.settings.max_attempts if self.guards else 1
        conversation = list(messages)
        for attempt in range(1, attempts + 1):
            reply = await self.chat(stage, settings, conversation, max_tokens, body)
            text, trip = self._judge(reply, clean, final, check) if len(reply.text) <= OFF_LOOP_CHARS else \
                await off_loop(self._judge, reply, clean, final, check, seconds=None, what="cleaning a reply")
            if trip is None:
                return text
            if trips is not None:
                trips.append(trip.guard)
            self.tally.update(f"guards.{trip.guard}")
            if trip.retry == "more_tokens":
                if max_tokens > settings.max_tokens:
                    break
                max_tokens *= 2
                conversation = list(messages)
            elif trip.retry == "corrective" and trip.correction:
                conversation = list(messages) + [{"role": "assistant", "content": reply.text},
                                                 {"role": "user", "content": trip.correction}]
            elif trip.retry == "remind":
                conversation = reminded(messages, trip.correction)
            else:
                conversation = list(messages)
        raise _guard_error(self.endpoints[settings.endpoint], stage, settings, trip, max_tokens, attempt)

    def _judge(self, reply: Reply, clean: Optional[Callable[[str], str]], final: bool,
               check: Optional[Callable[[str], Optional[Trip]]] = None) -> Tuple[str, Optional[Trip]]:
        """The reply cleaned, and the guard it trips, if any (the quality guards first, then `check`)."""
        text = clean_reply(reply.text)
        if clean is not None and reply.finish_reason != "length":
            try:
                text = clean(text)
            except ReplyRejected as rejected:
                return text, rejected.trip
        trip = self.guards.check(text, reply.finish_reason, final) if self.guards else \
            _basic_check(text, reply.finish_reason)
        if trip is None and check is not None:
            trip = check(text)
        return text, trip

    def in_flight(self) -> int:
        """Requests under way to every server of the run."""
        return sum(replica.limit - len(replica.free) for endpoint in self.endpoints.values()
                   for replica in endpoint.replicas)

    async def close(self) -> None:
        await asyncio.gather(*(replica.close() for endpoint in self.endpoints.values()
                               for replica in endpoint.replicas), return_exceptions=True)


def _guard_error(endpoint: Endpoint, stage: str, settings: StageConfig, trip: Trip, max_tokens: int,
                 attempts: int) -> GuardTripped:
    tried = f" (after {attempts} attempts)" if attempts > 1 else ""
    detail = f"{trip.reason} at {max_tokens} tokens (raise {stage}.max_tokens)" if trip.guard == "truncated" \
        else f"model '{settings.model}': {trip.reason}" if trip.fix else f"{trip.reason} from model '{settings.model}'"
    fix = f"; {trip.fix}" if trip.fix else ""
    return GuardTripped(redact(f"{endpoint.describe()}: {detail}{tried}{fix}"), trip.guard, attempts)


def _basic_check(text: str, finish_reason: Optional[str]) -> Optional[Trip]:
    if finish_reason == "length":
        return Trip("truncated", "reply cut off at max_tokens", "more_tokens")
    return None if text.strip() else Trip("empty", "empty reply")
