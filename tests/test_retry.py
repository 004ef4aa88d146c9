"""The one retry policy (tagcaption/retry.py): how long to wait, when to give up, which
failures are worth another try — as tables, the way openai-python tests
`_calculate_retry_timeout` — and both clients following it over real HTTP."""
from __future__ import annotations

import asyncio
import base64
import email.utils
import time

import httpx2
import pytest

from fake_servers import Error, Text
from tagcaption.config import Config, EndpointConfig, GuardsConfig, StageConfig, TagProviderConfig
from tagcaption.errors import GuardTripped, Kind, LLMError, NoVision, SourceError
from tagcaption.llm import LLM
from tagcaption.retry import RetryPolicy, is_retryable, parse_retry_after, retryable_status
from tagcaption.sinks import redact
from tagcaption.danbooru import DanbooruSource
from tagcaption.tally import Tally

NOW = 1_700_000_000.0  # Tue, 14 Nov 2023 22:13:20 GMT
POLICY = RetryPolicy(max_retries=5, backoff=0.5, max_backoff=8.0)


def http_date(moment: float) -> str:
    return email.utils.formatdate(moment, usegmt=True)


@pytest.mark.parametrize("headers, expected", [
    ({}, None),
    ({"retry-after": "2"}, 2.0),
    ({"Retry-After": "1.5"}, 1.5),
    ({"retry-after": " 7 "}, 7.0),
    ({"retry-after-ms": "250"}, 0.25),
    ({"Retry-After-Ms": "1500.5"}, 1.5005),
    ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
    ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
    ({"retry-after": "soon"}, None),
    ({"retry-after": ""}, None),
    ({"retry-after": "nan"}, None),
    ({"retry-after": "inf"}, None),
    ({"retry-after": "-5"}, -5.0),
    ({"retry-after": "100000"}, 100000.0),
    ({"retry-after": http_date(NOW + 30)}, 30.0),
    ({"retry-after": http_date(NOW - 30)}, -30.0),
    ({"retry-after": "Tue, 14 Nov 2023 22:14:20 -0000"}, 60.0),
    ({"retry-after": "Tue, 14 Nov 2023 23:13:20 +0100"}, 0.0),
    ({"retry-after": "Tue, 99 Nov 2023 22:13:20 GMT"}, None),
    ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, 253402300799.0 - NOW),
    (httpx2.Headers({"Retry-After": "4"}), 4.0),
])
def test_parse_retry_after(headers, expected):
    seconds = parse_retry_after(headers, now=NOW)
    if expected is None:
        assert seconds is None
    else:
        assert seconds == pytest.approx(expected)


def test_an_http_date_is_measured_from_now_by_default():
    assert parse_retry_after({"retry-after": http_date(time.time() + 60)}) == pytest.approx(60, abs=2)


@pytest.mark.parametrize("attempt, rand, expected", [
    (1, 1.0, 0.5), (2, 1.0, 1.0), (3, 1.0, 2.0), (4, 1.0, 4.0), (5, 1.0, 8.0), (6, 1.0, 8.0), (30, 1.0, 8.0),
    (1, 0.0, 0.25), (2, 0.0, 0.5), (5, 0.0, 4.0), (6, 0.0, 4.0),
    (3, 0.5, 1.5),
])
def test_backoff_doubles_with_jitter_and_is_capped(attempt, rand, expected):
    assert POLICY.delay(attempt, rand=lambda: rand) == pytest.approx(expected)


@pytest.mark.parametrize("attempt", range(1, 8))
def test_jitter_stays_within_half_and_all_of_the_ceiling(attempt):
    ceiling = min(POLICY.max_backoff, POLICY.backoff * 2 ** (attempt - 1))
    delays = [POLICY.delay(attempt) for _ in range(200)]
    assert all(ceiling * 0.5 <= delay <= ceiling for delay in delays)
    assert len(set(delays)) > 1


@pytest.mark.parametrize("headers, attempt, expected", [
    ({"retry-after": "3"}, 1, 3.0),
    ({"retry-after": "3"}, 5, 3.0),  # the server's word wins over the backoff, either way
    ({"retry-after": "0"}, 4, 0.0),
    ({"retry-after-ms": "20"}, 1, 0.02),
    ({"retry-after": "-5"}, 1, 0.0),
    ({"retry-after": "100000"}, 1, 120.0),
    ({"retry-after": "120.5"}, 1, 120.0),
    ({"retry-after": http_date(NOW + 30)}, 1, 30.0),
    ({"retry-after": http_date(NOW - 30)}, 1, 0.0),
    ({"retry-after": http_date(NOW + 86400)}, 1, 120.0),
    ({"retry-after": "soon"}, 1, 0.5),  # garbage: the backoff (rand=1.0)
    ({"retry-after": "soon"}, 3, 2.0),
    ({}, 2, 1.0),
])
def test_retry_after_wins_but_is_floored_and_capped(headers, attempt, expected):
    assert POLICY.delay(attempt, parse_retry_after(headers, now=NOW), rand=lambda: 1.0) == pytest.approx(expected)


def test_the_retry_after_cap_is_the_policys():
    assert RetryPolicy(3, 1.0, 60.0, max_retry_after=10.0).delay(1, 50.0) == 10.0


@pytest.mark.parametrize("max_retries, attempt, retryable, expected", [
    (3, 1, True, True), (3, 2, True, True), (3, 3, True, True), (3, 4, True, False), (3, 9, True, False),
    (3, 1, False, False), (0, 1, True, False), (0, 1, False, False), (1, 1, True, True), (1, 2, True, False),
])
def test_when_to_give_up(max_retries, attempt, retryable, expected):
    assert RetryPolicy(max_retries, 1.0, 60.0).should_retry(attempt, retryable) is expected


@pytest.mark.parametrize("status, expected", [
    (400, False), (401, False), (403, False), (404, False), (405, False), (407, False), (408, True), (409, True),
    (410, False), (413, False), (422, False), (425, False), (429, True), (499, False),
    (500, True), (502, True), (503, True), (504, True), (529, True), (599, True),
])
def test_retryable_statuses(status, expected):
    assert retryable_status(status) is expected
    assert is_retryable(Kind.HTTP, status) is expected


@pytest.mark.parametrize("kind, expected", [
    (Kind.TIMEOUT, True), (Kind.CONNECTION, True), (Kind.MALFORMED_REPLY, True), (Kind.REPLY_ERROR, True),
    (Kind.STREAM_ERROR, True), (Kind.STREAM_CUT, True), (Kind.EMPTY_CHOICES, True),
    (Kind.NO_VISION, False), (Kind.CONTEXT_OVERFLOW, False), (Kind.ERROR, False), (Kind.HTTP, False),
])
def test_retryable_kinds(kind, expected):
    assert is_retryable(kind) is expected


# --- both clients, over real HTTP -----------------------------------------------------------


def danbooru_settings(danbooru, **changes) -> TagProviderConfig:
    return TagProviderConfig(danbooru_url=danbooru.url, danbooru_rate=1000, **changes)


async def look_up(source: DanbooruSource, names):
    try:
        return await source.lookup(names)
    finally:
        await source.close()


def test_danbooru_honours_an_http_date_retry_after(danbooru):
    danbooru.wiki = {"cat": "A cat."}
    calls = []

    def override(path):
        calls.append(time.monotonic())
        if len(calls) == 1:
            return 503, "<html>busy</html>", "text/html", {"Retry-After": http_date(time.time() + 2)}
        return None
    danbooru.override = override
    tally = Tally()
    source = DanbooruSource(danbooru_settings(danbooru), tally)
    found = asyncio.run(look_up(source, ["cat"]))
    assert found["cat"].wiki == "A cat."
    assert calls[1] - calls[0] >= 1.0  # the date is whole seconds: at least 1 s, at most 2 s ahead
    assert tally["danbooru.requests"] == 2


@pytest.mark.parametrize("status, requests", [(408, 3), (409, 3), (429, 3), (500, 3), (400, 1), (404, 1)])
def test_danbooru_retries_what_the_policy_retries(danbooru, status, requests):
    danbooru.override = lambda path: (status, {"error": "no"}, "application/json", {"Retry-After": "0"})
    source = DanbooruSource(danbooru_settings(danbooru, danbooru_retries=2))
    with pytest.raises(SourceError, match=f"HTTP {status}"):
        asyncio.run(look_up(source, ["cat"]))
    assert source.tally["danbooru.requests"] == len(danbooru.api_requests()) == requests


def test_danbooru_basic_auth_is_redacted(danbooru):
    source = DanbooruSource(danbooru_settings(danbooru, login="someone", api_key="k3y-for-redaction-test"))
    asyncio.run(source.close())
    basic = base64.b64encode(b"someone:k3y-for-redaction-test").decode()
    assert redact(f"Authorization: Basic {basic}") == "Authorization: Basic ***"


def llm_for(server, **endpoint) -> tuple:
    settings = {"max_retries": 2, "retry_backoff": 0.01, "retry_max_backoff": 0.05, "stream": False, **endpoint}
    config = Config(endpoints={"default": EndpointConfig(base_url=server.base_url, **settings)},
                    guards=GuardsConfig(max_attempts=2))
    tally = Tally()
    return LLM.from_config(config, tally=tally), tally


async def complete(llm: LLM, text: str = "hello") -> str:
    try:
        return await llm.complete("interpreter", StageConfig(model="instruct-model"),
                                  [{"role": "user", "content": text}])
    finally:
        await llm.close()


def test_the_llm_honours_retry_after_ms_and_counts_through_the_tally(llm_server):
    replies = [Error(503, {"error": "Model is loading"}, {"retry-after-ms": "300"}), Text("A caption.")]
    llm_server.responder = lambda request: replies.pop(0)
    llm, tally = llm_for(llm_server)
    started = time.monotonic()
    assert asyncio.run(complete(llm)) == "A caption."
    assert time.monotonic() - started >= 0.3
    assert tally.group("requests") == {"interpreter": 2} and tally.group("retries") == {"interpreter": 1}
    assert tally["prompt_tokens.interpreter"] > 0 and tally["completion_tokens.interpreter"] > 0


@pytest.mark.parametrize("reply, error, record_kind, attempts", [
    (Error(400, {"error": {"message": "Invalid 'messages'"}}), LLMError, "http_400", 1),
    (Error(502, "<html>Bad Gateway</html>", {"Retry-After": "0"}), LLMError, "http_502", 3),
    (Error(400, {"error": "image input is not supported"}), NoVision, "no_vision", 1),
    (Error(400, {"error": {"message": "prompt is too long for the context window"}}), LLMError,
     "context_overflow", 1),
    (Text("I'm sorry, but I can't help with that."), GuardTripped, "guard_refusal", 2),
])
def test_llm_failures_keep_their_record_kinds(llm_server, reply, error, record_kind, attempts):
    llm_server.responder = lambda request: reply
    llm, tally = llm_for(llm_server)
    with pytest.raises(error) as raised:
        asyncio.run(complete(llm))
    assert raised.value.record_kind == record_kind and raised.value.attempts == attempts
    assert len(llm_server.chat_requests) == attempts
    if error is GuardTripped:
        assert tally.group("guards") == {"refusal": 2}
