"""Structured captions: `interpreter.response_schema` asks the caption as a JSON object.

The schema goes to the server as OpenAI's structured-output request,
`response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict": true}}`,
which vLLM, llama.cpp's server, LM Studio and Ollama's /v1 accept too; an endpoint with
`structured_output: none` gets none (for servers that refuse the field). Either way the
prompt ends with the schema, so a server that ignores the field still knows what to answer.

The reply is read leniently (a ```json fence, text around the object: the first `{…}` that
parses) and checked strictly against the schema (json_schema.py); a number no JSON file can
hold (NaN, 1e999) is refused, and lone surrogates are cleaned from every string as from a
caption (postprocess.only_text). A reply that does not
parse or follow the schema trips the `invalid_json` guard and is asked again, the corrective
turn naming the first problem. The object is kept as `<stem>.caption.json` (layout.py) and
the text caption is written from it by `interpreter.response_template`: `{field}`, `{a.b}`
for a nested field, lists and objects as their values joined with ", ", a missing or null
field as nothing. Without a template the top-level fields are joined with ", " in the
schema's order.
"""
from __future__ import annotations

import json
import math
import re
import string
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Optional, Tuple, Union

from tagcaption.errors import ConfigError, os_error_text
from tagcaption.files import read_regular
from tagcaption.guards import ReplyRejected, Trip
from tagcaption.json_schema import field_names, first_error, schema_problem
from tagcaption.postprocess import only_text_values
from tagcaption.sinks import contains_secret
from tagcaption.vocabulary import JSON_SCHEMA

if TYPE_CHECKING:
    from tagcaption.config import Config

MAX_SCHEMA_BYTES = 100_000
"""A caption schema is a few hundred bytes, and it is sent with every request."""
MAX_REPLY_CHARS = 65_536
"""A caption object is a few hundred characters; a reply far longer is not one."""
MAX_STARTS = 20
"""Places a `{` is tried at before the reply counts as holding no JSON object."""
MAX_DEPTH = 64
"""Levels of nesting a caption object may have (it is written out and cleaned recursively)."""
FENCE = re.compile(r"```[ \t]*(?:json)?[ \t]*\n?(.*?)```", re.DOTALL | re.IGNORECASE)
FIELD = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
INVALID_JSON = "invalid_json"
INVALID_JSON_FIX = ("a model that ignores the schema answers prose every time: check that the server takes "
                    "response_format (vLLM, llama.cpp, LM Studio and Ollama's /v1 do), or use a "
                    "model that follows JSON schemas")
SECRET = "secret"
SECRET_REASON = "the reply contains a configured API key (a server that echoes the request?)"

Piece = Union[str, Tuple[str]]


class NotFinite(ValueError):
    """A number JSON cannot hold (NaN, Infinity, or one past a float's range such as 1e999):
    written out again it would make `.caption.json` and `captions.jsonl` invalid JSON."""


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise NotFinite(f"a number that is not finite ({text})")
    return number


def _schema_number(text: str) -> float:
    if text in ("NaN", "Infinity", "-Infinity") or not math.isfinite(float(text)):
        raise NotFinite(f"{text} is not a number JSON allows")
    return float(text)


def extract(text: str) -> Tuple[Any, Optional[str]]:
    """The first JSON object in a reply (inside a ``` fence if there is one), or why none."""
    fenced = FENCE.search(text)
    if fenced and "{" in fenced.group(1):
        text = fenced.group(1)
    decoder = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite)
    start, problem = text.find("{"), "the reply holds no JSON object"
    for _ in range(MAX_STARTS):
        if start < 0:
            break
        try:
            return decoder.raw_decode(text, start)[0], None
        except json.JSONDecodeError as exc:
            problem = f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        except NotFinite as exc:  # the object is there, holding a number no JSON file can
            return None, str(exc)
        except ValueError as exc:
            problem = f"not valid JSON ({exc})"
        except RecursionError:
            return None, "the JSON is nested too deeply"
        start = text.find("{", start + 1)
    return None, problem


def texts(value: Any) -> Iterator[str]:
    """Every string in a parsed object, keys included (walked without recursion)."""
    waiting = [value]
    while waiting:
        item = waiting.pop()
        if isinstance(item, str):
            yield item
        elif isinstance(item, dict):
            waiting += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            waiting += item


def depth(value: Any) -> int:
    """How deeply lists and objects nest in `value` (counted without recursion)."""
    deepest, waiting = 0, [(value, 1)]
    while waiting:
        item, level = waiting.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, level)
            waiting += [(sub, level + 1) for sub in (item.values() if isinstance(item, dict) else item)]
    return deepest


def as_text(value: Any) -> str:
    """A field's value as caption text: lists and objects as their values joined with ", "."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, dict)):
        items = value.values() if isinstance(value, dict) else value
        return ", ".join(text for text in (as_text(item) for item in items) if text)
    return str(value).strip()


def lookup(value: Any, dotted: str) -> Any:
    """The field a template names: `a.b` is the field named so if there is one (a property
    name may hold a dot), else `b` inside `a`."""
    if not isinstance(value, dict):
        return None
    if dotted in value:
        return value[dotted]
    for cut in (index for index, char in enumerate(dotted) if char == "."):
        if dotted[:cut] in value:
            found = lookup(value[dotted[:cut]], dotted[cut + 1:])
            if found is not None:
                return found
    return None


def tidy(text: str) -> str:
    """The rendered caption without the marks an empty field leaves (", ,", " .", a leading ",")."""
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"[ \t]+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:[ \t]*[,;:])+", r"\1", text)
    text = re.sub(r"\.(?:[ \t]*[,;:.])+", ".", text)
    text = re.sub(r"^[ \t,.;:]+", "", text, flags=re.MULTILINE).strip()
    return re.sub(r"(^|[.!?][ \t]+)([a-z])", lambda match: match.group(1) + match.group(2).upper(), text)


class ResponseTemplate:
    """`interpreter.response_template`: the text caption from the object's fields."""

    def __init__(self, text: str, fields: List[str], origin: str):
        self.pieces: List[Piece] = []
        try:
            parsed = list(string.Formatter().parse(text))
        except ValueError as exc:
            raise ConfigError(f"interpreter.response_template {origin}: {exc} (write {{{{ and }}}} for "
                              "literal braces)") from None
        for literal, name, spec, conversion in parsed:
            if literal:
                self.pieces.append(literal)
            if name is None:
                continue
            if spec or conversion or not FIELD.fullmatch(name):
                raise ConfigError(f"interpreter.response_template {origin}: {{{name}}} is not a field name like "
                                  "{subject} or {camera.angle}")
            if name not in fields:
                raise ConfigError(f"interpreter.response_template {origin}: {{{name}}} is not a field of the "
                                  f"response schema (its fields: {', '.join(fields)})")
            self.pieces.append((name,))

    def render(self, value: dict) -> str:
        return "".join(piece if isinstance(piece, str) else as_text(lookup(value, piece[0])) for piece in self.pieces)


def _read_text(path: Path, key: str) -> str:
    try:
        data = read_regular(path)
    except OSError as exc:
        raise ConfigError(os_error_text(exc, path, key)) from None
    if len(data) > MAX_SCHEMA_BYTES:
        raise ConfigError(f"{key} {path} is {len(data) // 1000} KB; a caption's is a few hundred bytes "
                          f"(at most {MAX_SCHEMA_BYTES // 1000} KB, as it is sent with every request)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ConfigError(f"{key} {path} is not UTF-8 text") from None


def load_schema(path: Path) -> dict:
    """The schema in `path`, checked: a JSON object of type object that this validator knows."""
    key = "interpreter.response_schema"
    try:
        schema = json.loads(_read_text(path, key), parse_constant=_schema_number, parse_float=_schema_number)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{key} {path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") \
            from None
    except NotFinite as exc:
        raise ConfigError(f"{key} {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{key} {path} is nested too deeply") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"{key} {path} must hold a JSON Schema object ({{\"type\": \"object\", ...}}), "
                          f"not a {type(schema).__name__}")
    if schema.get("type") != "object" or not schema.get("properties"):
        raise ConfigError(f"{key} {path}: the schema must be \"type\": \"object\" with the caption's fields under "
                          "\"properties\" (see templates/structured/caption.schema.json)")
    problem = schema_problem(schema)
    if problem:
        raise ConfigError(f"{key} {path}: {problem}")
    return schema


class StructuredCaption:
    """The schema, how the text caption is written from a reply, and what a request carries."""

    def __init__(self, schema: dict, name: str, template: Optional[ResponseTemplate], retry_mode: str):
        self.schema, self.name, self.template, self.retry_mode = schema, name, template, retry_mode
        self.instruction = (
            "Answer with a JSON object instead of prose: only the object, with nothing before or after it, "
            "following this JSON Schema (each text field a short phrase in natural English):\n"
            + json.dumps(schema, ensure_ascii=False))

    @classmethod
    def from_config(cls, config: "Config") -> Optional["StructuredCaption"]:
        """None without `interpreter.response_schema`; ConfigError for a bad schema or template."""
        settings = config.interpreter
        if not settings.response_schema:
            return None
        path = config.resource(settings.response_schema)
        schema = load_schema(path)
        template = None
        if settings.response_template:
            where = config.resource(settings.response_template)
            template = ResponseTemplate(_read_text(where, "interpreter.response_template"), field_names(schema),
                                        str(where))
        title = schema.get("title") if isinstance(schema.get("title"), str) else ""
        name = re.sub(r"[^A-Za-z0-9_-]", "_", title or path.name.split(".")[0])[:64] or "caption"
        return cls(schema, name, template, config.guards.retry_mode)

    def body(self, structured_output: str) -> Dict[str, Any]:
        """What a request to an endpoint with this `structured_output` carries beside the prompt."""
        if structured_output != JSON_SCHEMA:
            return {}
        return {"response_format": {"type": "json_schema",
                                    "json_schema": {"name": self.name, "schema": self.schema, "strict": True}}}

    def read(self, text: str) -> dict:
        """The object a reply holds; ReplyRejected (the invalid_json guard) when it holds none
        that follows the schema."""
        if len(text) > MAX_REPLY_CHARS:
            raise ReplyRejected(Trip(INVALID_JSON, f"a reply of {len(text):,} characters, not a caption object"))
        value, problem = extract(text)
        if problem is None and depth(value) > MAX_DEPTH:
            problem = f"the JSON is nested more than {MAX_DEPTH} levels deep"
        if problem is None:
            value = only_text_values(value)  # as a caption's text: whole characters, no escapes
        if problem is None and any(contains_secret(item) for item in texts(value)):
            # JSON escapes (`\u0073k-…`) hide a key from the guard that reads the reply's text
            raise ReplyRejected(Trip(SECRET, SECRET_REASON))
        if problem is None:
            problem = first_error(value, self.schema)
        if problem is not None:
            raise ReplyRejected(Trip(
                INVALID_JSON, f"a reply that is not the JSON object asked for ({problem})", self.retry_mode,
                f"That answer is not the JSON object asked for: {problem}. Answer again with only the JSON "
                "object, following the schema.", fix=INVALID_JSON_FIX))
        return value

    def render(self, value: dict) -> str:
        if self.template is not None:
            return tidy(self.template.render(value))
        return tidy(", ".join(text for text in (as_text(value.get(name)) for name in self.schema["properties"])
                              if text))
