"""A small JSON Schema validator for structured captions, so that no dependency is added.

It knows the part of JSON Schema a caption schema needs: `type` (one or a list of string,
number, integer, boolean, array, object, null), `properties`, `required`,
`additionalProperties` (false, or a schema for the others), `items`, `enum`, `const`,
`minLength` / `maxLength`, `minItems` / `maxItems`, `minimum` / `maximum`,
`exclusiveMinimum` / `exclusiveMaximum` and `multipleOf`. Words that only describe
(`title`, `description`, `$schema`, `examples`, `default`…) are ignored, and so is `format`,
an annotation in JSON Schema: it goes to the server, which may hold the model to it, but no
answer is refused for it here. Every other word (`$ref`, `anyOf`, `pattern`,
`minProperties`, `if`…, or a misspelt one) would silently not be checked: `schema_problem`
refuses it when the config is read, by a list of the words known.

`first_error` returns the first way a value breaks the schema, as a sentence the model can
act on ("missing required field 'setting'"), or None.
"""
from __future__ import annotations

import decimal
import difflib
import operator
from typing import Any, List, Optional

from tagcaption.sinks import shorten

TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
CHECKED = ("type", "properties", "required", "additionalProperties", "items", "enum", "const", "multipleOf",
           *COUNTS, *BOUNDS)
DESCRIBING = ("title", "description", "$schema", "$id", "$comment", "examples", "default", "deprecated", "readOnly",
              "writeOnly", "format", "$defs", "definitions")
"""Words that change no answer's validity (`$defs` only holds schemas for a `$ref`, refused)."""
KNOWN = frozenset(CHECKED + DESCRIBING)
BROKEN_BY = (("minimum", operator.lt, "at least"), ("exclusiveMinimum", operator.le, "more than"),
             ("maximum", operator.gt, "at most"), ("exclusiveMaximum", operator.ge, "less than"))
"""Each bound, the comparison of the value with it that breaks it, and what it asks for."""
MAX_DEPTH = 32
"""Levels of nested schemas at most: a caption needs a few."""


def type_of(value: Any) -> str:
    """The JSON type name of a parsed value, as a message names it (3.0 is "number" here;
    `_is` still lets a whole float pass as an integer)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object" if isinstance(value, dict) else type(value).__name__


def _is(value: Any, name: str) -> bool:
    kind = type_of(value)
    if name == "number":
        return kind in ("number", "integer")
    if name == "integer":
        return kind == "integer" or (kind == "number" and float(value).is_integer())
    return kind == name


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, 1 is 1.0."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _name(path: str) -> str:
    return f"'{path}'" if path else "the answer"


def _article(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def first_error(value: Any, schema: dict, path: str = "") -> Optional[str]:
    """The first way `value` breaks `schema` (checked by schema_problem), or None."""
    types = schema.get("type")
    if types is not None:
        wanted = [types] if isinstance(types, str) else list(types)
        if not any(_is(value, name) for name in wanted):
            return f"{_name(path)} must be {' or '.join(_article(name) for name in wanted)} " \
                   f"(got {_article(type_of(value))})"
    if "const" in schema and not _same(value, schema["const"]):
        return f"{_name(path)} must be {schema['const']!r}"
    if "enum" in schema and not any(_same(value, option) for option in schema["enum"]):
        options = ", ".join(repr(option) for option in schema["enum"][:12])
        return f"{_name(path)} must be one of {options} (got {shorten(value, 60)!r})"
    for problem in (_length(value, schema, path), _bound(value, schema, path)):
        if problem:
            return problem
    if isinstance(value, dict):
        return _object_error(value, schema, path)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problem = first_error(item, schema["items"], f"{path}[{index}]")
            if problem:
                return problem
    return None


def _length(value: Any, schema: dict, path: str) -> Optional[str]:
    if not isinstance(value, (str, list)):
        return None
    unit = "characters" if isinstance(value, str) else "items"
    low, high = ("minLength", "maxLength") if isinstance(value, str) else ("minItems", "maxItems")
    if low in schema and len(value) < schema[low]:
        return f"{_name(path)} must have at least {schema[low]} {unit} (got {len(value)})"
    if high in schema and len(value) > schema[high]:
        return f"{_name(path)} must have at most {schema[high]} {unit} (got {len(value)})"
    return None


def _bound(value: Any, schema: dict, path: str) -> Optional[str]:
    if not _is(value, "number"):
        return None
    for word, breaks, wanted in BROKEN_BY:
        if word in schema and breaks(value, schema[word]):
            return f"{_name(path)} must be {wanted} {schema[word]} (got {shorten(value, 40)})"
    if "multipleOf" in schema and not _multiple(value, schema["multipleOf"]):
        return f"{_name(path)} must be a multiple of {schema['multipleOf']} (got {shorten(value, 40)})"
    return None


def _multiple(value: Any, step: Any) -> bool:
    """Whether `value` is a whole number of `step`s, in decimal as they are written (0.3 is a
    multiple of 0.1, as the model meant it), exactly for any float or integer's size."""
    with decimal.localcontext(decimal.Context(prec=1000)):
        try:
            return decimal.Decimal(repr(value)) % decimal.Decimal(repr(step)) == 0
        except decimal.DecimalException:  # a quotient past 1000 digits (an integer of thousands)
            return False


def _object_error(value: dict, schema: dict, path: str) -> Optional[str]:
    properties = schema.get("properties") or {}
    prefix = f"{path}." if path else ""
    for name in schema.get("required") or ():
        if name not in value:
            return f"missing required field '{prefix}{name}'"
    extra = schema.get("additionalProperties", True)
    for name, item in value.items():
        if name in properties:
            problem = first_error(item, properties[name], f"{prefix}{name}")
        elif extra is False:
            problem = f"unexpected field '{prefix}{name}' (the fields are {', '.join(properties) or 'none'})"
        elif isinstance(extra, dict):
            problem = first_error(item, extra, f"{prefix}{name}")
        else:
            problem = None
        if problem:
            return problem
    return None


# --- the schema itself, when the config is read ------------------------------------------


def schema_problem(schema: Any, where: str = "the schema", depth: int = 0) -> Optional[str]:
    """What makes `schema` one this validator cannot check faithfully, or None; `where` names
    the place in the schema (`properties.camera.items`)."""
    if not isinstance(schema, dict):
        return f"{where} must be an object (got {_article(type_of(schema))})"
    if depth > MAX_DEPTH:
        return f"{where} is nested more than {MAX_DEPTH} levels deep"
    unknown = [word for word in schema if word not in KNOWN]
    if unknown:
        meant = difflib.get_close_matches(str(unknown[0]), sorted(KNOWN), 1, 0.8)
        hint = f" (did you mean {meant[0]}?)" if meant else ""
        return (f"{where} uses {shorten(unknown[0], 60)}, which the built-in validator does not check{hint}: write "
                "the schema out with type, properties, required, items and enum (a list of types, such as "
                "[string, null], makes a field nullable)")
    for check in (_type_problem, _list_problems, _number_problems):
        problem = check(schema, where)
        if problem:
            return problem
    return _nested_problem(schema, where, depth)


def _type_problem(schema: dict, where: str) -> Optional[str]:
    types = schema.get("type")
    if types is None:
        return None
    listed = [types] if isinstance(types, str) else types
    if not isinstance(listed, list) or not listed or not all(isinstance(name, str) for name in listed):
        return f"{where}: type must be a type name or a list of them"
    unknown = [name for name in listed if name not in TYPES]
    return f"{where}: unknown type {unknown[0]!r} (use {', '.join(TYPES)})" if unknown else None


def _list_problems(schema: dict, where: str) -> Optional[str]:
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        return f"{where}: enum must be a list of the values allowed"
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(name, str) for name in required):
        return f"{where}: required must be a list of field names"
    properties = schema.get("properties", {})
    if not isinstance(properties, dict):
        return f"{where}: properties must map each field name to its schema"
    missing = [name for name in required if properties and name not in properties]
    return f"{where}: required field '{missing[0]}' is not under properties" if missing else None


def _number_problems(schema: dict, where: str) -> Optional[str]:
    for word in COUNTS:
        value = schema.get(word)
        if word in schema and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            return f"{where}: {word} must be a whole number, 0 or more (got {value!r})"
    for word in BOUNDS:
        value = schema.get(word)
        if word in schema and (isinstance(value, bool) or not isinstance(value, (int, float))):
            return f"{where}: {word} must be a number (got {shorten(repr(value), 60)})"
    step = schema.get("multipleOf", 1)
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step <= 0:
        return f"{where}: multipleOf must be a number above 0 (got {shorten(repr(step), 60)})"
    return None


def _nested_problem(schema: dict, where: str, depth: int) -> Optional[str]:
    nested: List[tuple] = [(sub, _under(where, f"properties.{name}"))
                           for name, sub in (schema.get("properties") or {}).items()]
    items = schema.get("items")
    if items is not None:
        if not isinstance(items, dict):
            return f"{where}: items must be one schema for every item (a list of schemas is not supported)"
        nested.append((items, _under(where, "items")))
    extra = schema.get("additionalProperties", True)
    if not isinstance(extra, (bool, dict)):
        return f"{where}: additionalProperties must be true, false or a schema"
    if isinstance(extra, dict):
        nested.append((extra, _under(where, "additionalProperties")))
    for sub, place in nested:
        problem = schema_problem(sub, place, depth + 1)
        if problem:
            return problem
    return None


def _under(where: str, place: str) -> str:
    return place if where == "the schema" else f"{where}.{place}"


def field_names(schema: dict, prefix: str = "", depth: int = 0) -> List[str]:
    """Every field a template may name: `subject`, and for nested objects `camera.angle`."""
    names: List[str] = []
    for name, sub in (schema.get("properties") or {}).items():
        names.append(prefix + name)
        if isinstance(sub, dict) and depth < MAX_DEPTH:
            names += field_names(sub, f"{prefix}{name}.", depth + 1)
    return names
