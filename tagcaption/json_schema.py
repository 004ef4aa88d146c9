"""A small JSON Schema validator for structured captions, so that no dependency is added.

It knows the part of JSON Schema a caption schema needs: `type` (one or a list of string,
number, integer, boolean, array, object, null), `properties`, `required`,
`additionalProperties` (false, or a schema for the others), `items`, `enum`, `const`,
`minLength` / `maxLength`, `minItems` / `maxItems`, `minimum` / `maximum`. Words that
only describe (`title`, `description`, `$schema`, `examples`…) are ignored. What it does
not know and would silently not check (`$ref`, `anyOf`, `oneOf`, `allOf`, `not`, `pattern`,
a list as `items`) is refused when the config is read, by `schema_problem`.

`first_error` returns the first way a value breaks the schema, as a sentence the model can
act on ("missing required field 'setting'"), or None.
"""
from __future__ import annotations

from typing import Any, List, Optional

from tagcaption.sinks import shorten

TYPES = ("string", "number", "integer", "boolean", "array", "object", "null")
UNSUPPORTED = ("$ref", "anyOf", "oneOf", "allOf", "not", "if", "pattern", "patternProperties",
               "dependentRequired", "dependentSchemas", "prefixItems", "uniqueItems", "contains")
COUNTS = ("minLength", "maxLength", "minItems", "maxItems")
BOUNDS = ("minimum", "maximum")
MAX_DEPTH = 32
"""Levels of nested schemas at most: a caption needs a few."""


def type_of(value: Any) -> str:
    """The JSON type name of a parsed value (a whole float such as 3.0 is an integer too)."""
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
    if "minimum" in schema and value < schema["minimum"]:
        return f"{_name(path)} must be at least {schema['minimum']} (got {value})"
    if "maximum" in schema and value > schema["maximum"]:
        return f"{_name(path)} must be at most {schema['maximum']} (got {value})"
    return None


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
    unsupported = [word for word in UNSUPPORTED if word in schema]
    if unsupported:
        return (f"{where} uses {unsupported[0]}, which the built-in validator does not check: write the schema out "
                "with type, properties, required, items and enum (a list of types, such as [string, null], "
                "makes a field nullable)")
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
            return f"{where}: {word} must be a number (got {value!r})"
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
