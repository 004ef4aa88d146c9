"""Configuration errors in the user's words: what the YAML parser, OmegaConf or the override
parser found, as one line naming the key, what was given and what it takes
(`output.formats: expected a list such as [txt,jsonl], got 'jsonl'`)."""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from typing import Any, Optional

from tagcaption.errors import ConfigError
from tagcaption.sinks import shorten

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


ITEM_EXAMPLES = {"prompt_variants": "{style: descriptive, weight: 2} or {prompts: [\"Describe it.\"]}"}
"""What one entry of a list of mappings looks like, by the list's last key."""


def in_user_words(exc: Exception, schema: type) -> str:
    """One line for an OmegaConf error about a key (or an entry of a list, `key[0]`)."""
    key = getattr(exc, "full_key", None) or ""
    value = getattr(exc, "value", None)
    entry = re.fullmatch(r"(.+)\[\d+\]", key)
    if entry and field_type(schema, entry.group(1)) is not None:
        example = ITEM_EXAMPLES.get(entry.group(1).rsplit(".", 1)[-1], "`key: value` lines")
        given = f", got {value!r}" if value is not None else ""
        return f"{key}: each entry is a mapping of keys, such as {example}{given}"
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


def check_keys(data: object, schema: type, prefix: str) -> None:
    """Reject unknown keys with the closest valid one, before OmegaConf's own checks."""
    if not dataclasses.is_dataclass(schema):
        return
    if not isinstance(data, dict):
        where = f"config key {prefix.rstrip('.')}" if prefix else "the config file"
        raise ConfigError(f"{where} must be a mapping of keys (like `key: value` lines), "
                          f"not {type(data).__name__} {shorten(data, 60)!r}")
    known = {f.name: f for f in dataclasses.fields(schema) if not f.metadata.get("internal")}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"unknown config key '{full}'{_suggest(str(key), known, prefix)}")
        annotation = typing.get_type_hints(schema).get(key)
        if annotation is not None and getattr(annotation, "__origin__", None) is dict:
            value_type = annotation.__args__[1]
            if not isinstance(value, dict):
                raise ConfigError(f"config key {full} must be a mapping of names to settings")
            for name, sub in value.items():
                check_keys(sub, value_type, f"{full}.{name}.")
        elif annotation is not None and dataclasses.is_dataclass(annotation):
            check_keys(value, annotation, f"{full}.")


def _suggest(key: str, known, prefix: str) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.5)
    return f"; did you mean '{prefix}{close[0]}'?" if close else f"; valid keys here: {', '.join(known)}"


def check_text_lists(value: object, key: str = "") -> None:
    """Every list of text in the config holds text only: OmegaConf lets `[[1]]` or `[{a: b}]`
    through where the program expects names, and they would fail far from the config."""
    if dataclasses.is_dataclass(value):
        hints = typing.get_type_hints(type(value))
        for item in dataclasses.fields(value):
            sub = getattr(value, item.name)
            full = f"{key}.{item.name}" if key else item.name
            base = _unwrap(hints.get(item.name))
            if typing.get_origin(base) is list and typing.get_args(base) == (str,) and isinstance(sub, list):
                wrong = next((entry for entry in sub if not isinstance(entry, str)), None)
                if wrong is not None:
                    raise ConfigError(f"{full}: expected a list such as {EXAMPLES.get(full, '[a,b]')} (text "
                                      f"only), got {wrong!r} in it")
            else:
                check_text_lists(sub, full)
    elif isinstance(value, dict):
        for name, sub in value.items():
            check_text_lists(sub, f"{key}.{name}")
    elif isinstance(value, list):
        for index, sub in enumerate(value):
            check_text_lists(sub, f"{key}[{index}]")
