"""`python caption.py check`: can this config work? One table, one fix per failure.

For every endpoint a stage uses: reach `/models`, see whether the model is listed (a
warning only: some servers list placeholder names), send a one-token text request (for the
Interpreter with the response_format a structured caption's requests carry), and for the
Interrogator's model a tiny image, as the run sends them (the endpoint's deadlines,
its reading of a reply: an error object in an HTTP 200 fails), and ask the server how many requests it runs at
once (shown beside the concurrency that would be used); then try the tag source. Nothing
is written.
"""
from __future__ import annotations

import base64
import io
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

import httpx2
import openai
from PIL import Image

from tagcaption import tls
from tagcaption.config import Config, StageConfig
from tagcaption.deadlines import MODELS_SECONDS
from tagcaption.endpoint import Endpoint, Replica, is_loopback
from tagcaption.errors import ConfigError, Kind, ServerUnreachable, SourceError
from tagcaption.faithfulness import Faithfulness
from tagcaption.llm import LLM
from tagcaption.interpreter import REFUSED, Interpreter
from tagcaption.interrogator import Interrogator
from tagcaption.placeholders import SUMMARY_PLACEHOLDERS
from tagcaption.plan import RunPlan, plan_run
from tagcaption.sinks import say
from tagcaption.templates import Template
from tagcaption.replies import Fault, classify
from tagcaption.slots import AUTO, advice, table_cell
from tagcaption.tag_sources import make_source
from tagcaption.vocabulary import INTERPRETER, INTERROGATOR, TAG_PROVIDER

COMMON_PORTS = {1234: "LM Studio", 11434: "Ollama", 8000: "vLLM", 8080: "llama.cpp", 5000: "text-generation-webui"}


@dataclass
class Row:
    endpoint: str
    model: str
    stage: str
    reachable: str = "-"
    listed: str = "-"
    text: str = "-"
    vision: str = "-"
    latency: str = "-"
    slots: str = "-"
    fixes: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.reachable == "yes" and self.text in ("ok", "-") and self.vision in ("ok", "-")


def _tiny_image() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 40, 40)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def _other_port(url: str) -> Optional[str]:
    """On this machine, a nearby or common port where an OpenAI-compatible server answers
    when the configured one does not: the usual cause is a typo in the port."""
    parts = urlsplit(url)
    if not is_loopback(url) or parts.port is None:
        return None
    nearby = [parts.port + step for step in (-1, 1, -2, 2, -10, 10) if 0 < parts.port + step < 65536]
    for port in nearby + [port for port in COMMON_PORTS if port not in nearby]:
        if port == parts.port:
            continue
        candidate = url.replace(f":{parts.port}", f":{port}", 1)
        client = openai.AsyncOpenAI(base_url=candidate, api_key="check", max_retries=0, timeout=1.0,
                                    http_client=openai.DefaultAsyncHttpxClient(
                                        trust_env=False, verify=tls.context_for(candidate)))
        try:
            await client.models.list()
        except openai.OpenAIError:
            continue
        finally:
            await client.close()
        name = f" ({COMMON_PORTS[port]}'s default)" if port in COMMON_PORTS else ""
        return f"a server answers at {candidate}{name}: is port {parts.port} a typo for {port}?"
    return None


def _fix_for(exc: BaseException, row: Row, url: str) -> str:
    fault = exc if isinstance(exc, Fault) else classify(exc)
    message = str(fault)
    if fault.status == 401:
        return f"the server refused the API key: set endpoints.{row.endpoint}.api_key"
    if fault.status == 404 or "model" in message.lower() and "not found" in message.lower():
        return f"load the model '{row.model}' in the server, or set {row.stage}.model to one it lists"
    if fault.kind is Kind.CONNECTION and not fault.unreachable:  # it answered, then broke off
        return f"{message}: the server took the request and dropped it (see its log)"
    if fault.kind is Kind.CONNECTION:
        proxy = any(os.environ.get(name) for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"))
        hint = " (a proxy is set in the environment: check NO_PROXY for this host)" if proxy and not is_loopback(url) else ""
        return f"nothing answers at {url}: start the server or fix the port{hint}"
    if fault.kind is Kind.TIMEOUT:
        return (f"{message}: the server took longer than endpoints.{row.endpoint}.timeout or request_timeout "
                "allow (is it busy, or still loading the model?)")
    return message


async def _check_replica(llm: LLM, row: Row, settings: StageConfig, replica: Replica, vision: bool,
                         extra: Dict[str, Any]) -> None:
    started = time.monotonic()
    try:
        models = await llm.endpoints[settings.endpoint].models_of(replica, MODELS_SECONDS)
    except httpx2.TransportError as exc:
        row.reachable = "no"
        row.fixes.append(_fix_for(exc, row, replica.base_url))
        other = await _other_port(replica.base_url)
        if other:
            row.fixes.append(other)
        return
    except ServerUnreachable as exc:  # a refused key, or a base_url without its /v1: no request would do
        row.reachable, row.listed = "yes", "?"
        row.text = "refused" if "API key" in str(exc) else "failed"
        row.vision = row.text if vision else row.vision
        row.fixes.append(str(exc))
        return
    row.reachable = "yes"
    _note_listed(row, settings.model, models)
    owners = [str(model.get("owned_by", "")) for model in models]
    row.latency = f"{(time.monotonic() - started) * 1000:.0f} ms"
    await _check_slots(llm, row, settings, replica, owners)
    await _check_chat(llm.endpoints[settings.endpoint], row, settings, replica, vision, extra)


def _note_listed(row: Row, model: str, models: List[dict]) -> None:
    """Whether the server lists the stage's model ("?" when it lists nothing readable: the
    run's own reading of /models has said why)."""
    listed = [str(entry.get("id")) for entry in models if entry.get("id") is not None]
    if not listed:
        row.listed = "?"
        return
    row.listed = "yes" if model in listed else "no"
    if row.listed == "no" and any(entry.get("owned_by") == "llamacpp" for entry in models):
        row.listed = "any name"  # llama.cpp answers to any model name
    if row.listed == "no":
        row.fixes.append(f"warning: '{model}' is not among the models listed ({', '.join(listed[:6])})")


async def _check_chat(endpoint: Endpoint, row: Row, settings: StageConfig, replica: Replica, vision: bool,
                      extra: Optional[Dict[str, Any]] = None) -> None:
    """A one-token text request, and for a vision stage one with a tiny image, sent, bounded
    and read as the run does: an answer the run could not use (an error object in a 200, no
    choices) fails like a refusal. `extra`: what the run's requests carry beside the prompt
    (the Interpreter's response_format), so that a server refusing it fails here, not on
    every image."""
    plain = {"model": settings.model, "messages": [{"role": "user", "content": "Say OK."}],
             endpoint.config.token_limit_param: 1}
    try:
        await endpoint.ask(replica, {**plain, **(extra or {})})
        row.text = "ok"
    except Fault as fault:
        row.text = "failed"
        row.fixes.append(await _refused_field(endpoint, row, replica, plain, fault) if extra and
                         fault.status in REFUSED else _fix_for(fault, row, replica.base_url))
    if vision:
        body = dict(plain, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What colour is this?"}, {"type": "image_url", "image_url": {"url": _tiny_image()}}]}])
        try:
            await endpoint.ask(replica, body)
            row.vision = "ok"
        except Fault as fault:
            row.vision = "failed"
            message = str(fault)
            row.fixes.append(f"the model cannot see images ({message}): load a vision model; for llama.cpp start "
                             "llama-server with --mmproj" if fault.kind is Kind.NO_VISION or "image" in
                             message.lower() or "multimodal" in message.lower()
                             else _fix_for(fault, row, replica.base_url))


async def _refused_field(endpoint: Endpoint, row: Row, replica: Replica, plain: Dict[str, Any], fault: Fault) -> str:
    """The fix for a request with response_format refused (HTTP 400 or 422): when the same
    request without it is answered, the field is what the server refuses."""
    try:
        await endpoint.ask(replica, plain)
    except Fault as other:
        return _fix_for(other, row, replica.base_url)
    return (f"the server refuses response_format, which the run's requests carry for interpreter.response_schema "
            f"({fault}): set endpoints.{row.endpoint}.structured_output=none (the schema then goes in the prompt "
            "only)")


async def _check_slots(llm: LLM, row: Row, settings: StageConfig, replica: Replica, owners: List[str]) -> None:
    """The server's parallel slots beside the concurrency that would be used, and a warning
    when that leaves slots idle (asked once per server, however many stages use it)."""
    endpoint = llm.endpoints[settings.endpoint]
    configured = AUTO if endpoint.auto else endpoint.config.concurrency
    asked = replica.slots is not None
    server = replica.slots if asked else await endpoint.probe_slots(replica, owners)
    row.slots = table_cell(configured, replica.limit, server)
    warning = advice(settings.endpoint, configured, replica.limit, server)
    if warning and not asked:
        row.fixes.append(warning)


def _plan(config: Config, llm: LLM) -> Tuple[RunPlan, List[str], Dict[str, Any]]:
    """The run's plan, built as a run builds it, every setup problem found on the way
    (templates, styles, a caption template that would throw the description away), and the
    stages built (by name)."""
    problems = []
    built = {}
    builders = ((TAG_PROVIDER, lambda: Template.load(config.resource(config.tag_provider.prompt_template),
                                                     SUMMARY_PLACEHOLDERS)),
                (INTERROGATOR, lambda: Interrogator(config, llm)), (INTERPRETER, lambda: Interpreter(config, llm)))
    for name, build in builders:
        if not getattr(config, name).skip:
            try:
                built[name] = build()
            except ConfigError as exc:
                problems.append(str(exc))
    try:
        Faithfulness(config)  # reads the table of opposites
    except ConfigError as exc:
        problems.append(str(exc))
    if not problems:
        try:
            return plan_run(config, built.get(INTERROGATOR), built.get(INTERPRETER)), problems, built
        except ConfigError as exc:
            problems.append(str(exc))
    return plan_run(config), problems, built


async def run_check(config: Config) -> int:
    llm = LLM.from_config(config)
    plan, setup, built = _plan(config, llm)
    for problem in setup:
        say(f"config: {problem}")
    for line in plan.describe():
        say(f"plan: {line}")
    rows: List[Row] = []
    try:
        for step in plan.steps:
            settings = getattr(config, step.stage)
            for replica in llm.endpoints[settings.endpoint].replicas:
                row = Row(settings.endpoint, settings.model, step.stage)
                extra = getattr(built.get(step.stage), "body", {}) if step.stage == INTERPRETER else {}
                await _check_replica(llm, row, settings, replica, step.stage == INTERROGATOR, extra)
                rows.append(row)
        tags_line, tags_ok = await _check_tags(config) if plan.lookups else ("", True)
    finally:
        await llm.close()
    say(_table(rows))
    if tags_line:
        say(tags_line)
    for row in rows:
        for fix in row.fixes:
            say(f"  {row.stage} ({row.endpoint}, {row.model}): {fix}")
    works = all(row.ok for row in rows) and tags_ok and not setup
    say("Everything this config needs works." if works else "Some of what this config needs does not work.")
    return 0 if works else 2


async def _check_tags(config: Config):
    if config.tag_provider.skip:
        return "", True
    try:
        source = make_source(config)
    except Exception as exc:  # a bad dump file or source name: reported like any other failure
        return f"tag source: failed: {exc}", False
    started = time.monotonic()
    try:
        found = await source.lookup(["1girl"])
        known = found["1girl"].known
        return (f"tag source: {source.describe()}: ok, {(time.monotonic() - started) * 1000:.0f} ms"
                + ("" if known else " (it does not know the tag '1girl')")), True
    except SourceError as exc:
        return (f"tag source: {source.describe()}: failed: {exc} (captions would be made with tags only). To stop "
                "asking it: tag_provider.source=none, or a local dump: tag_provider.source=file "
                "tag_provider.dump_dir=… (docs/tag-knowledge.md)"), False
    finally:
        await source.close()


def _table(rows: List[Row]) -> str:
    header = ("stage", "endpoint", "model", "reachable", "listed", "text OK", "vision OK", "latency",
              "slots/concurrency")
    lines = [header] + [(r.stage, r.endpoint, r.model, r.reachable, r.listed, r.text, r.vision, r.latency, r.slots)
                        for r in rows]
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(str(value).ljust(width) for value, width in zip(line, widths)) for line in lines)

