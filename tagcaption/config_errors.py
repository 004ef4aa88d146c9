"""Configuration errors in the user's words: what the YAML parser, OmegaConf or the override
parser found, as one line naming the key, what was given and what it takes
(`output.formats: expected a list such as [txt,jsonl], got 'jsonl'`)."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Optional

EXAMPLES = {"output.formats": "[txt,jsonl]", "interrogator.prompts": '["Describe the image."]',
            "interrogator.hint_sources": "[full_path,tags]", "tags.sources": "[txt,sidecar]",
            "tags.exclude": "[absurdres,watermark]", "tags.exclude_categories": "[meta,artist]",
            "style.extra_options": "[no_resolution]", "endpoints.default.base_url": "http://localhost:1234/v1"}


def field_type(schema: type, dotted: str) -> Optional[Any]:
    """The annotation of a dotted key in the config schema (None when not found)."""
    annotation: Any = schema
    for part in dotted.split("."):
        annotation = _unwrap(annotation)
        if typing.get_origin(annotation) is dict:
            annotation = typing.get_args(annotation)[1]
            continue
        if not dataclasses.is_dataclass(annotation):
            return None
        hints = typing.get_type_hints(annotation)
        if part not in hints:
            return None
        annotation = hints[part]
    return annotation


def _unwrap(annotation: Any) -> Any:
    if typing.get_origin(annotation) is typing.Union:
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def expected(schema: type, key: str) -> str:
    annotation = field_type(schema, key)
    optional = typing.get_origin(annotation) is typing.Union and type(None) in typing.get_args(annotation)
    base = _unwrap(annotation)
    origin = typing.get_origin(base)
    if origin in (list, tuple):
        words = f"a list such as {EXAMPLES.get(key, '[a,b]')}"
    elif origin is dict or dataclasses.is_dataclass(base):
        words = "a mapping of keys (`key: value` lines)"
    else:
        words = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(base, "a value")
    return f"{words} or null" if optional else words


def in_user_words(exc: Exception, schema: type) -> str:
    """One line for an OmegaConf error about a key."""
    key = getattr(exc, "full_key", None) or ""
    value = getattr(exc, "value", None)
    if key and field_type(schema, key) is not None:
        given = f", got {value!r}" if value is not None else ""
        return f"{key}: expected {expected(schema, key)}{given}"
    message = str(getattr(exc, "msg", exc)).strip().splitlines()
    return f"{key or 'the config'}: {message[0] if message else type(exc).__name__}"


def yaml_problem(exc: Exception) -> str:
    """What a YAML error found and where ("found duplicate key interpreter (line 3, column 1)"),
    not the first line of its message, which only says what the parser was doing."""
    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    if not problem:
        text = str(exc).strip()
        return text.splitlines()[0] if text else type(exc).__name__
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem
