"""The built-in JSON Schema validator of structured captions, from tables of cases."""
import json

import pytest

from tagcaption.json_schema import field_names, first_error, schema_problem
from tagcaption.structured import as_text, extract, tidy

CAPTION = {"type": "object",
           "properties": {"subject": {"type": "string", "minLength": 2, "maxLength": 40},
                          "style": {"enum": ["photo", "anime"]},
                          "count": {"type": "integer", "minimum": 0, "maximum": 9},
                          "score": {"type": "number"},
                          "nsfw": {"type": "boolean"},
                          "note": {"type": ["string", "null"]},
                          "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 3},
                          "camera": {"type": "object", "properties": {"angle": {"type": "string"}},
                                     "required": ["angle"], "additionalProperties": False}},
           "required": ["subject", "style"],
           "additionalProperties": False}
GOOD = {"subject": "a cat", "style": "photo"}


@pytest.mark.parametrize("value, error", [
    (GOOD, None),
    ({**GOOD, "count": 3, "score": 0.5, "nsfw": False, "note": None, "tags": ["a"], "camera": {"angle": "low"}}, None),
    ({**GOOD, "count": 3.0}, None),
    ({"style": "photo"}, "missing required field 'subject'"),
    ({**GOOD, "camera": {}}, "missing required field 'camera.angle'"),
    ({**GOOD, "mood": "calm"}, "unexpected field 'mood'"),
    ({**GOOD, "camera": {"angle": "low", "lens": "50mm"}}, "unexpected field 'camera.lens' (the fields are angle)"),
    ({**GOOD, "subject": 3}, "'subject' must be a string (got an integer)"),
    ({**GOOD, "subject": "a"}, "'subject' must have at least 2 characters (got 1)"),
    ({**GOOD, "subject": "x" * 41}, "'subject' must have at most 40 characters (got 41)"),
    ({**GOOD, "style": "sketch"}, "'style' must be one of 'photo', 'anime' (got 'sketch')"),
    ({**GOOD, "count": 2.5}, "'count' must be an integer (got a number)"),
    ({**GOOD, "count": True}, "'count' must be an integer (got a boolean)"),
    ({**GOOD, "count": 10}, "'count' must be at most 9 (got 10)"),
    ({**GOOD, "count": -1}, "'count' must be at least 0 (got -1)"),
    ({**GOOD, "score": "high"}, "'score' must be a number (got a string)"),
    ({**GOOD, "nsfw": 0}, "'nsfw' must be a boolean (got an integer)"),
    ({**GOOD, "note": 1}, "'note' must be a string or a null (got an integer)"),
    ({**GOOD, "tags": []}, "'tags' must have at least 1 items (got 0)"),
    ({**GOOD, "tags": ["a", "b", "c", "d"]}, "'tags' must have at most 3 items (got 4)"),
    ({**GOOD, "tags": ["a", 2]}, "'tags[1]' must be a string (got an integer)"),
    ({**GOOD, "camera": "low"}, "'camera' must be an object (got a string)"),
    (["not", "an", "object"], "the answer must be an object (got an array)"),
    (None, "the answer must be an object (got a null)"),
])
def test_a_value_is_checked_against_the_schema(value, error):
    found = first_error(value, CAPTION)
    assert found is None if error is None else found.startswith(error), found


@pytest.mark.parametrize("schema, problem", [
    (CAPTION, None),
    ({"type": "object", "properties": {"a": {"type": "strin"}}},
     "properties.a: unknown type 'strin' (use string, number, integer, boolean, array, object, null)"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}}, "properties.a uses $ref"),
    ({"type": "object", "properties": {"a": {"anyOf": [{"type": "string"}]}}}, "properties.a uses anyOf"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": "a"},
     "the schema: required must be a list of field names"),
    ({"type": "object", "properties": {"a": {"type": "string"}}, "required": ["b"]},
     "the schema: required field 'b' is not under properties"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "properties.a: enum must be a list of the values allowed"),
    ({"type": "object", "properties": {"a": {"type": "string", "minLength": -1}}},
     "properties.a: minLength must be a whole number, 0 or more (got -1)"),
    ({"type": "object", "properties": {"a": {"type": "array", "items": [{"type": "string"}]}}},
     "properties.a: items must be one schema for every item"),
    ({"type": "object", "properties": {"a": "string"}}, "properties.a must be an object (got a string)"),
    ({"type": "object", "properties": [1]}, "the schema: properties must map each field name to its schema"),
    ({"type": "object", "additionalProperties": "no"}, "the schema: additionalProperties must be true, false"),
])
def test_a_schema_the_validator_cannot_check_is_named_when_the_config_is_read(schema, problem):
    found = schema_problem(schema)
    assert (found is None) if problem is None else (found is not None and found.startswith(problem)), found


def test_a_schema_nested_past_the_limit_is_refused():
    schema = {"type": "string"}
    for _ in range(40):
        schema = {"type": "object", "properties": {"a": schema}}
    assert "nested more than 32 levels deep" in schema_problem(schema)


def test_fields_a_template_may_name_include_nested_ones():
    assert field_names(CAPTION) == ["subject", "style", "count", "score", "nsfw", "note", "tags", "camera",
                                    "camera.angle"]


@pytest.mark.parametrize("reply, value", [
    ('{"subject": "a cat"}', {"subject": "a cat"}),
    ('```json\n{"subject": "a cat"}\n```', {"subject": "a cat"}),
    ('Here is the JSON:\n```\n{"subject": "a {cat}"}\n```\nHope it helps!', {"subject": "a {cat}"}),
    ('Sure {not json} then {"subject": "a cat"} done', {"subject": "a cat"}),
    ('<- {"a": {"b": [1, 2]}} ->', {"a": {"b": [1, 2]}}),
])
def test_the_first_object_of_a_reply_is_read(reply, value):
    assert extract(reply) == (value, None)


@pytest.mark.parametrize("reply, problem", [
    ("A cat on a mat.", "the reply holds no JSON object"),
    ('{"subject": "a cat"', "not valid JSON (Expecting ',' delimiter at line 1, column 20)"),
    ('{"score": NaN}', "not valid JSON (NaN is not JSON)"),
    ("[" * 100_000 + "{}" + "]" * 100_000, None),
    ('{"a":' * 100_000, "nested too deeply"),
])
def test_a_reply_without_an_object_says_why(reply, problem):
    value, found = extract(reply)
    if problem is None:
        assert value == {} and found is None
    else:
        assert value is None and problem in found


@pytest.mark.parametrize("value, text", [
    ("  a cat ", "a cat"), (None, ""), (True, "true"), (3, "3"), (2.50, "2.5"),
    (["a", "", None, "b"], "a, b"), ({"x": "low", "y": ["wide", "shot"]}, "low, wide, shot"),
])
def test_a_field_becomes_caption_text(value, text):
    assert as_text(value) == text


@pytest.mark.parametrize("rendered, caption", [
    ("a photograph of a cat, , sitting , in a park. close-up.", "A photograph of a cat, sitting, in a park. Close-up."),
    (", in a park.  .", "In a park."),
    ("a cat. . .", "A cat."),
])
def test_a_rendered_caption_loses_the_marks_of_empty_fields(rendered, caption):
    assert tidy(rendered) == caption


def test_the_shipped_schema_is_one_the_validator_checks_fully():
    from tagcaption import DATA_DIR
    schema = json.loads((DATA_DIR / "templates/structured/caption.schema.json").read_text())
    assert schema_problem(schema) is None
    assert first_error({name: "x" for name in schema["properties"]}, schema) is None
    assert sorted(schema["required"]) == sorted(schema["properties"]) and schema["additionalProperties"] is False
