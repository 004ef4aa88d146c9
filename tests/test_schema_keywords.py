"""Every keyword of a caption schema is either checked, or only describes, or is refused when
the config is read: a keyword accepted and not checked would let through the answers it
forbids (docs/training.md, "Structured captions")."""
import pytest

from tagcaption.json_schema import first_error, schema_problem


def field(**words):
    return {"type": "object", "properties": {"a": words}}


@pytest.mark.parametrize("words, word", [
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": "object", "maxProperties": 3}, "maxProperties"),
    ({"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}, "propertyNames"),
    ({"type": "string", "if": {"const": "x"}, "then": {"minLength": 2}}, "if"),
    ({"type": "string", "then": {"minLength": 2}}, "then"),
    ({"type": "string", "else": {"minLength": 2}}, "else"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "patternProperties": {"^x": {"type": "string"}}}, "patternProperties"),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"type": "array", "contains": {"type": "string"}}, "contains"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "string", "pattern": "^a"}, "pattern"),
    ({"type": "string", "nullable": True}, "nullable"),
    ({"type": "string", "maxlength": 3}, "maxlength"),
])
def test_a_keyword_the_validator_does_not_check_stops_the_run(words, word):
    problem = schema_problem(field(**words))
    assert problem is not None and problem.startswith(f"properties.a uses {word}, which the built-in validator "
                                                      "does not check"), problem


def test_a_misspelt_keyword_is_named_with_the_one_meant():
    problem = schema_problem({"type": "object", "properties": {"a": {"type": "string"}}, "requried": ["a"]})
    assert "the schema uses requried" in problem and "(did you mean required?)" in problem


@pytest.mark.parametrize("words", [
    {"type": "string", "title": "A", "description": "B", "examples": ["c"], "default": "d", "$comment": "e"},
    {"type": "string", "format": "date-time"},
    {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1, "multipleOf": 0.25},
])
def test_keywords_that_describe_or_are_checked_are_accepted(words):
    assert schema_problem({"$schema": "https://json-schema.org/draft/2020-12/schema", **field(**words)}) is None


@pytest.mark.parametrize("words, problem", [
    ({"exclusiveMinimum": True}, "properties.a: exclusiveMinimum must be a number (got True)"),
    ({"exclusiveMaximum": "9"}, "properties.a: exclusiveMaximum must be a number (got '9')"),
    ({"multipleOf": 0}, "properties.a: multipleOf must be a number above 0 (got 0)"),
    ({"multipleOf": -2}, "properties.a: multipleOf must be a number above 0 (got -2)"),
])
def test_a_bound_that_is_not_a_number_is_refused(words, problem):
    assert schema_problem(field(type="number", **words)) == problem


BOUNDED = field(type="number", exclusiveMinimum=0, exclusiveMaximum=10, multipleOf=0.1)


@pytest.mark.parametrize("value, error", [
    (5, None), (0.3, None), (9.9, None), (1e-1, None),
    (0, "'a' must be more than 0 (got 0)"),
    (-1, "'a' must be more than 0 (got -1)"),
    (10, "'a' must be less than 10 (got 10)"),
    (10.5, "'a' must be less than 10 (got 10.5)"),
    (0.25, "'a' must be a multiple of 0.1 (got 0.25)"),
])
def test_exclusive_bounds_and_multiples_are_checked(value, error):
    assert first_error({"a": value}, BOUNDED) == error


@pytest.mark.parametrize("value, step, error", [
    (12, 3, None), (13, 3, "'a' must be a multiple of 3 (got 13)"), (10 ** 30, 7, "'a' must be a multiple of 7"),
    (1e308, 1e-300, None), (7.5, 2.5, None),
])
def test_multiples_hold_for_large_and_small_numbers(value, step, error):
    found = first_error({"a": value}, field(type="number", multipleOf=step))
    assert found is None if error is None else found.startswith(error), found

