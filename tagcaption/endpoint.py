"""One configured endpoint: its servers, how many requests each may carry, and the one
retry loop every request goes through.

Every retry goes through `RetryPolicy` and is counted. Requests go out on each replica's
own httpx2 clients, chat requests through wire.py (over http1.py for an `http://` server);
no module of a run imports the OpenAI SDK, which costs a quarter of a second. Each
attempt goes to the replica with the most free slots; a replica that fails `rest_after`
times in a row rests for `rest_seconds` while the others carry on. When every replica has
failed to connect `stop_after_failures` times in a row, or every request has failed to
connect for `down_after` seconds, the server is gone: `ServerDown` stops the run.

`concurrency: auto` is settled per replica when the models are listed at the start (see
slots.py); until then, and where the server does not say, the documented default holds.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Tuple
import urllib.request
from urllib.parse import urlsplit

import httpx2

from tagcaption import tls
from tagcaption.config import EndpointConfig
from tagcaption.deadlines import MODELS_SECONDS
from tagcaption.http1 import Pool
from tagcaption.errors import Kind, LLMError, NoVision, ServerDown, ServerUnreachable
from tagcaption.replies import Fault, classify, error_message, status_message
from tagcaption.retry import RetryPolicy
from tagcaption.sinks import redact, register_secret
from tagcaption.slots import AUTO, DEFAULT_CONCURRENCY, Slots, probe_slots
from tagcaption.version import USER_AGENT
from tagcaption.wire import Bounds, Reply, encode_body, exchange, get_small

__all__ = ["Endpoint", "Replica", "Reply", "is_loopback"]

log = logging.getLogger("caption")

SERVER_HINTS = (
    "start your server, for example: LM Studio: Developer tab > Start Server (http://localhost:1234/v1); "
    "Ollama: `ollama serve` (http://localhost:11434/v1); vLLM: `vllm serve MODEL` (http://localhost:8000/v1); "
    "llama.cpp: `llama-server -m model.gguf --port 8080` (http://localhost:8080/v1)"
)
TLS_HINT = ("the server's TLS certificate is not trusted: set SSL_CERT_FILE to a PEM file holding it "
            "(or the authority that signed it)")

CLIENT_SLOTS = 4
"""Requests in flight per HTTP client of a replica (see Replica)."""

Count = Callable[[str, int], None]
"""Hears `("requests", 1)` before each attempt and `("retries", 1)` before each retry."""


def builtin_transport(url: str, config: EndpointConfig) -> bool:
    """Whether chat requests to `url` go over http1.py: plain HTTP, `transport: auto`, and no
    proxy from the environment that httpx2 would have used (none is used for this machine)."""
    if config.transport != "auto" or not url.startswith("http://"):
        return False
    if is_loopback(url):
        return True
    proxies = urllib.request.getproxies_environment()
    host = urlsplit(url).hostname or ""
    return not (proxies.get("http") or proxies.get("all")) or bool(urllib.request.proxy_bypass_environment(host))


def is_loopback(url: str) -> bool:
    """Whether `url` names this machine: `localhost` or `*.localhost`, a loopback address or
    an unspecified one (0.0.0.0, ::), or this machine's own host name. Nothing is looked up
    but this machine's fully qualified name, and that only for a name that starts like it."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = _inet_aton(host)
        if address is None:
            return host == _own_name() or host.split(".")[0] == _own_name().split(".")[0] and host == _own_fqdn()
    address = getattr(address, "ipv4_mapped", None) or address
    return address.is_loopback or address.is_unspecified


def _inet_aton(host: str) -> Optional[ipaddress.IPv4Address]:
    """The address of an IPv4 short form that connecting takes (`127.1`, `0x7f.1`, `2130706433`)."""
    if not host or host.strip("0123456789abcdefx.") or not host[0].isdigit():
        return None
    try:
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def _own_name() -> str:
    return socket.gethostname().rstrip(".").lower()


def _own_fqdn() -> str:
    """Asked only for a name that starts like this machine's (a lookup may be slow)."""
    return socket.getfqdn().rstrip(".").lower()


class Replica:
    """One server behind an endpoint: its clients, how busy it is, whether it is resting,
    and how many times in a row it could not be reached.

    Its chat requests are spread over several HTTP clients of CLIENT_SLOTS requests each:
    httpx2's connection pool probes every idle connection's socket whenever a request comes
    or goes, which with 32 connections in one pool cost more CPU than the request itself."""

    def __init__(self, base_url: str, config: EndpointConfig):
        self.base_url = base_url.rstrip("/")
        self._timeout = config.timeout
        self.http = self._http_client()
        self.headers = {"Authorization": f"Bearer {config.api_key or 'no-key'}", "Content-Type": "application/json",
                        "Accept": "application/json, text/event-stream", "User-Agent": USER_AGENT}
        self.chat_url = self.url("/chat/completions")
        self.chat_clients = [self.http]
        self.pool = Pool(self.chat_url, config.timeout, self.http) if builtin_transport(base_url, config) else None
        """Chat requests over http1.py (None: over httpx2, `chat_clients`)."""
        self.limit = 0
        self.free: List[int] = []
        self.set_limit(DEFAULT_CONCURRENCY if config.concurrency == AUTO or config.auto_concurrency
                       else config.concurrency)
        self.slots: Optional[Slots] = None
        """What the server said about its slots, once asked."""
        self.failures = 0
        self.rested_until = 0.0
        self.unreached = 0
        """Connection attempts in a row that could not reach it."""
        self.last_unreached = float("-inf")

    def _http_client(self) -> httpx2.AsyncClient:
        # A system proxy must not intercept a server on this machine (a classic mysterious 502).
        return httpx2.AsyncClient(trust_env=not is_loopback(self.base_url), verify=tls.context_for(self.base_url),
                                  timeout=httpx2.Timeout(self._timeout), follow_redirects=True,
                                  limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=100))

    def url(self, path: str) -> httpx2.URL:
        """`path` under the base URL, its query (`?api-version=…`) kept; parsed once, not per request."""
        base = httpx2.URL(self.base_url)
        return base.copy_with(path=base.path.rstrip("/") + path)

    def set_limit(self, limit: int) -> None:
        """Carry `limit` requests at once (before the first request, or with none in flight)."""
        self.limit = limit
        while self.pool is None and len(self.chat_clients) * CLIENT_SLOTS < limit:
            self.chat_clients.append(self._http_client())
        self.free = list(range(limit - 1, -1, -1))

    def sender(self, slot: int):
        """What carries the chat request in `slot`: the pool, or one of the httpx2 clients."""
        return self.pool or self.chat_clients[slot // CLIENT_SLOTS]

    async def close(self) -> None:
        closing = [client.aclose() for client in self.chat_clients] + ([self.pool.aclose()] if self.pool else [])
        await asyncio.gather(*closing, return_exceptions=True)


class Endpoint:
    """One named endpoint: one server or several replicas of it, a concurrency limit per
    replica, and the retry loop for its requests."""

    def __init__(self, name: str, config: EndpointConfig):
        self.name = name
        self.config = config
        self.auto = config.concurrency == AUTO or config.auto_concurrency
        config.auto_concurrency = self.auto
        urls = [config.base_url] if isinstance(config.base_url, str) else list(config.base_url)
        self.replicas = [Replica(url, config) for url in urls]
        self.base_url = self.replicas[0].base_url
        register_secret(config.api_key)
        self.policy = RetryPolicy(config.max_retries, config.retry_backoff, config.retry_max_backoff)
        self.bounds = Bounds(config.request_timeout, config.max_reply_bytes)
        self._freed = asyncio.Condition()
        self._failing_since: Optional[float] = None
        self._publish_concurrency()

    @property
    def capacity(self) -> int:
        """Requests this endpoint carries at once, every replica together."""
        return sum(replica.limit for replica in self.replicas)

    def _publish_concurrency(self) -> None:
        """Put the number in force into the config in place of `auto`, so that whatever reads
        `concurrency` (the number of workers) sees it: per replica, rounded up. The config
        remembers that it was `auto` (`auto_concurrency`), so an endpoint built from it again
        asks the server again."""
        if self.auto:
            self.config.concurrency = math.ceil(self.capacity / len(self.replicas))

    def describe(self, replica: Optional[Replica] = None) -> str:
        return f"endpoint '{self.name}' ({(replica or self.replicas[0]).base_url})"

    async def list_models(self, timeout: float = MODELS_SECONDS) -> List[str]:
        """Model ids from `/models` (and with `concurrency: auto`, each replica's slots);
        raises ServerUnreachable when no replica answers or one refuses the API key. A server
        that answers but lists nothing usable costs a warning."""
        listed: List[str] = []
        unreachable = []
        for replica in self.replicas:
            try:
                models = await self.models_of(replica, timeout)
            except httpx2.TransportError as exc:
                unreachable.append(f"cannot reach {self.describe(replica)}: {error_message(exc)}")
                replica.rested_until = time.monotonic() + self.config.rest_seconds
                replica.unreached = self.config.stop_after_failures
                continue
            listed += [str(model.get("id")) for model in models if model.get("id")]
            if self.auto:
                await self.probe_slots(replica, [model.get("owned_by", "") for model in models])
        if len(unreachable) == len(self.replicas):
            hint = TLS_HINT if any("CERTIFICATE_VERIFY_FAILED" in line for line in unreachable) else SERVER_HINTS
            raise ServerUnreachable(redact(f"{'; '.join(unreachable)}. {hint}"))
        for line in unreachable:
            log.warning("warning: %s; resting it, the other replicas carry on", line)
        return listed

    async def models_of(self, replica: Replica, timeout: float = MODELS_SECONDS) -> List[dict]:
        """`replica`'s `/models` entries, read as a run reads them (and as `check` shows them)."""
        try:
            response = await get_small(replica.http, replica.url("/models"), replica.headers, timeout)
            body = response.text
        except httpx2.TransportError:
            raise  # unreachable: the caller says so
        except httpx2.HTTPError as exc:  # it answered, but not with a list: a redirect loop, a broken gzip
            log.warning("warning: %s could not list its models (%s); going on", self.describe(replica),
                        redact(error_message(exc)))
            return []
        if response.status_code == 401:
            raise ServerUnreachable(redact(f"{self.describe(replica)} refused the API key: "
                                           f"{status_message(401, body, response.reason_phrase)}. "
                                           f"Set endpoints.{self.name}.api_key"))
        try:
            models = response.json().get("data") if response.status_code < 400 else None
        except (ValueError, AttributeError):
            models = None
        if not isinstance(models, list) and response.status_code == 404:
            await self._missing_v1(replica, timeout)
        if not isinstance(models, list):
            problem = status_message(response.status_code, body, response.reason_phrase) \
                if response.status_code >= 400 else "not a list of models"
            log.warning("warning: %s could not list its models (%s); going on", self.describe(replica),
                        redact(problem))
            return []
        return [model for model in models if isinstance(model, dict)]

    async def _missing_v1(self, replica: Replica, timeout: float) -> None:
        """A base_url without its `/v1` (`http://localhost:1234`) answers 404 to every chat
        request: say so before the first one, when the URL with `/v1` lists models."""
        base = replica.base_url
        if base.rstrip("/").endswith("/v1"):
            return
        try:
            response = await get_small(replica.http, f"{base}/v1/models", replica.headers, timeout)
            listed = response.status_code == 200 and isinstance(response.json().get("data"), list)
        except (httpx2.HTTPError, ValueError, AttributeError):
            return
        if listed:
            raise ServerUnreachable(redact(f"{self.describe(replica)} answers at {base}/v1, not at {base}: set "
                                           f"endpoints.{self.name}.base_url={base}/v1"))

    async def probe_slots(self, replica: Replica, owners: List[str] = ()) -> Slots:
        """Ask the replica how many requests it runs at once; with `auto`, use the answer."""
        replica.slots = await probe_slots(replica.http, replica.base_url, replica.headers, owners)
        if self.auto:
            replica.set_limit(replica.slots.concurrency)
            self._publish_concurrency()
        return replica.slots

    async def chat(self, params: Dict[str, Any], count: Count) -> Tuple[Reply, Any]:
        """Send a chat request, retrying transient faults as `self.policy` says."""
        body = self._body(params)
        attempt = 0
        while True:
            attempt += 1
            count("requests", 1)
            replica, slot = await self._take_replica()
            started = time.monotonic()
            try:
                result = await exchange(replica.sender(slot), replica.chat_url, replica.headers, body, self.bounds)
            except Exception as exc:  # classified below: anything the server or transport can throw
                fault = exc if isinstance(exc, Fault) else classify(exc)
            else:
                replica.failures = replica.unreached = 0
                self._failing_since = None
                return result
            finally:
                await self._give_back(replica, slot)
            self._note_replica_failure(replica, fault)
            self._note_failure(replica, fault, started, attempt)
            if not self.policy.should_retry(attempt, fault.retryable):
                raise _final_error(f"{self.describe(replica)}: {fault}", fault, attempt)
            count("retries", 1)
            await asyncio.sleep(self.policy.delay(attempt, fault.retry_after))

    async def ask(self, replica: Replica, params: Dict[str, Any]) -> Tuple[Reply, Any]:
        """One chat request to `replica` as the run sends it (its body, `timeout`,
        `request_timeout`, `max_reply_bytes` and reading of the reply), neither retried nor
        counted: what `check` tries. Raises Fault for anything but a usable reply."""
        try:
            return await exchange(replica.sender(0), replica.chat_url, replica.headers, self._body(params), self.bounds)
        except Fault:
            raise
        except Exception as exc:  # classified: anything the server or transport can throw
            raise classify(exc) from None

    def _body(self, params: Dict[str, Any]) -> bytes:
        if not self.config.stream:
            return encode_body(params)
        streamed: Dict[str, Any] = {**params, "stream": True}
        if self.config.stream_usage:
            streamed["stream_options"] = {"include_usage": True}
        return encode_body(streamed)

    async def _take_replica(self) -> Tuple[Replica, int]:
        """The replica with the most free slots among those not resting, and one of its
        slots (a resting replica's share is not piled onto the others: its slots wait instead)."""
        async with self._freed:
            while True:
                replica = self._pick()
                if replica.free:
                    return replica, replica.free.pop()
                await self._freed.wait()

    async def _give_back(self, replica: Replica, slot: int) -> None:
        async with self._freed:
            replica.free.append(slot)
            self._freed.notify()

    def _pick(self) -> Replica:
        now = time.monotonic()
        ready = [replica for replica in self.replicas if replica.rested_until <= now]
        if not ready:
            return min(self.replicas, key=lambda replica: replica.rested_until)
        return max(ready, key=lambda replica: len(replica.free))

    def _note_replica_failure(self, replica: Replica, fault: Fault) -> None:
        if not fault.retryable or len(self.replicas) == 1:
            return
        replica.failures += 1
        if replica.failures >= self.config.rest_after and replica.rested_until <= time.monotonic():
            replica.rested_until = time.monotonic() + self.config.rest_seconds
            log.warning("warning: %s failed %d times in a row (%s); resting it for %.0f s",
                        self.describe(replica), replica.failures, redact(str(fault)), self.config.rest_seconds)
            replica.failures = 0

    def _note_failure(self, replica: Replica, fault: Fault, started: float, attempt: int) -> None:
        """Raise ServerDown once every replica has failed to connect `stop_after_failures`
        times in a row, or every request has failed to connect for `down_after` seconds.
        Attempts in flight together fail together: only one that left after the replica's
        last such failure adds to its count, so a blip that fails them all counts once."""
        if fault.kind not in (Kind.CONNECTION, Kind.TIMEOUT):
            self._failing_since = None  # the server answered: it is up
            replica.unreached = 0
            return
        now = time.monotonic()
        if fault.unreachable and started >= replica.last_unreached:
            replica.unreached += 1
            replica.last_unreached = now
        limit = self.config.stop_after_failures
        if all(other.unreached >= limit for other in self.replicas):
            which = "no replica" if len(self.replicas) > 1 else "it"
            raise ServerDown(redact(f"{self.describe()} has not answered for {limit} connection attempts in a "
                                    f"row ({which} could be reached: {fault}); stopping. {SERVER_HINTS}"), attempt)
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since >= self.config.down_after:
            hint = SERVER_HINTS if fault.unreachable else f"it answers, but no reply finishes in time: raise " \
                f"endpoints.{self.name}.request_timeout, or look at the server's log"
            raise ServerDown(redact(f"{self.describe()} has not answered for {now - self._failing_since:.0f} s "
                                    f"({fault}); stopping. {hint}"), attempt)


def _final_error(where: str, fault: Fault, attempts: int) -> LLMError:
    tried = f" after {attempts} attempts" if attempts > 1 else ""
    message = redact(f"{where}{tried}")
    if fault.kind is Kind.NO_VISION:
        return NoVision(message, attempts)
    return LLMError(message, fault.kind, attempts, status=fault.status)
