"""`interpreter.response_schema`: captions asked as JSON objects, against the loopback servers."""
from __future__ import annotations

import json

import pytest

from conftest import ROOT, make_dataset, run_caption, write_config
from fake_servers import Error, Text, user_text

SCHEMA = str(ROOT / "templates/structured/caption.schema.json")
TEMPLATE = str(ROOT / "templates/structured/caption.txt")
GOOD = {"subject": "a red cat", "appearance": "short fur and green eyes", "action": "sitting on a mat",
        "setting": "in a sunny kitchen", "style": "a photograph", "camera": "close-up"}
CAPTION = "A photograph of a red cat, short fur and green eyes, sitting on a mat, in a sunny kitchen. Close-up."


def config(tmp_path, server, danbooru, **sections):
    interpreter = {"response_schema": SCHEMA, "response_template": TEMPLATE, **sections.pop("interpreter", {})}
    sections.setdefault("tag_provider", {"source": "none"})
    return write_config(tmp_path / "config.yaml", server.base_url, danbooru.url, interpreter=interpreter, **sections)


def in_turn(server, *replies):
    """The n-th reply to the n-th request (one image)."""
    return lambda request: Text(replies[len(server.chat_requests) - 1])


def test_prose_then_a_missing_field_then_fenced_json(tmp_path, llm_server, danbooru, capsys):
    missing = {key: value for key, value in GOOD.items() if key != "setting"}
    llm_server.responder = in_turn(llm_server, "Sure! A red cat sits on a mat.", json.dumps(missing),
                                   "Here you go:\n```json\n" + json.dumps(GOOD, indent=2) + "\n```")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat, red"})
    path = config(tmp_path, llm_server, danbooru, output={"formats": ["txt", "jsonl"]})

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out
    first, second, third = llm_server.chat_requests
    for request in (first, second, third):
        assert request["response_format"]["type"] == "json_schema"
        assert request["response_format"]["json_schema"]["name"] == "caption"
        assert request["response_format"]["json_schema"]["strict"] is True
        assert request["response_format"]["json_schema"]["schema"] == json.loads(open(SCHEMA).read())
    assert "following this JSON Schema" in user_text(first) and '"setting"' in user_text(first)
    assert second["messages"][1] == {"role": "assistant", "content": "Sure! A red cat sits on a mat."}
    assert "not the JSON object asked for: the reply holds no JSON object" in second["messages"][2]["content"]
    assert "missing required field 'setting'" in third["messages"][-1]["content"]
    assert (images / "a.txt").read_text() == CAPTION
    assert json.loads((images / "a.caption.json").read_text()) == GOOD
    record = json.loads((images / "captions.jsonl").read_text())
    assert record["caption"] == CAPTION and record["structured"] == GOOD
    assert record["guards"] == ["invalid_json", "invalid_json"]
    assert "invalid json 2" in out and "<name>.txt and <name>.caption.json next to the images" in out
    assert not (images / "a.json").exists(), "never <stem>.json, a downloader's sidecar"


def test_an_endpoint_that_refuses_response_format_gets_the_schema_in_the_prompt(tmp_path, llm_server, danbooru,
                                                                                  capsys):
    llm_server.responder = lambda request: Text(json.dumps(GOOD))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, endpoints={"default": {"structured_output": "none"}},
                  interpreter={"response_template": None})

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out
    (request,) = llm_server.chat_requests
    assert "response_format" not in request and '"camera"' in user_text(request)
    assert (images / "a.txt").read_text() == ("A red cat, short fur and green eyes, sitting on a mat, in a sunny kitchen, "
                                              "a photograph, close-up"), "without a template: the fields in order"


def test_structured_variants_keep_a_list_of_objects(tmp_path, llm_server, danbooru, capsys):
    other = dict(GOOD, subject="a ginger kitten", action="curled up asleep", camera="seen from above")
    llm_server.responder = lambda request: Text(json.dumps(GOOD if request["seed"] == 0 else other))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, output={"variants": 2, "formats": ["txt", "metadata"]})

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out
    lines = (images / "a.txt").read_text().split("\n")
    assert lines == [CAPTION, "A photograph of a ginger kitten, short fur and green eyes, curled up asleep, in a sunny "
                              "kitchen. Seen from above."]
    assert json.loads((images / "a.caption.json").read_text()) == [GOOD, other]
    assert json.loads((images / "metadata.jsonl").read_text())["variants"] == lines


def test_a_second_run_never_reads_a_structured_caption_as_a_sidecar(tmp_path, llm_server, danbooru, capsys):
    """`a.png`'s `a.caption.json` is the `<stem>.json` of `a.caption.png`: not its sidecar."""
    schema = {"type": "object", "properties": {"subject": {"type": "string"},
                                               "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["subject", "tags"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "template.txt").write_text("{subject}")
    llm_server.responder = lambda request: Text(json.dumps({"subject": "A cat.", "tags": ["secret_word"]}))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "a.caption.png": "dog", "c.png": None})
    (images / "c.json").write_text(json.dumps({"tag_string_general": "sidecar_tag", "rating": "g"}))
    path = config(tmp_path, llm_server, danbooru, interpreter={"response_schema": "schema.json",
                                                              "response_template": "template.txt"},
                  tags={"combine": "all"}, interrogator={"hint_sources": ["sidecar_json"]})

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)
    assert code == 0, out
    assert json.loads((images / "a.caption.json").read_text())["tags"] == ["secret_word"]
    first_run = len(llm_server.chat_requests)
    code, out, _ = run_caption([str(images), "--config", str(path), "output.overwrite=true"], capsys)

    assert code == 0, out
    prompts = {}
    for request in llm_server.chat_requests[first_run:]:
        text = user_text(request)
        prompts["a.caption.png" if "dog" in text else "c.png" if "sidecar" in text else "a.png"] = text
    assert len(prompts) == 3, prompts
    assert "secret_word" not in prompts["a.caption.png"] and "Metadata" not in prompts["a.caption.png"]
    assert "secret_word" not in prompts["a.png"]
    assert "sidecar tag" in prompts["c.png"], "a real sidecar is still read"


def test_another_images_sidecar_is_never_replaced(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Text(json.dumps(GOOD))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "a.caption.png": None})
    sidecar = json.dumps({"tag_string_general": "dog", "rating": "g"})
    (images / "a.caption.json").write_text(sidecar)
    path = config(tmp_path, llm_server, danbooru)

    code, out, err = run_caption([str(images), "--config", str(path), "output.overwrite=true"], capsys)

    assert code == 1
    assert "a.caption.json is the sidecar of a.caption.png" in out + err
    assert (images / "a.caption.json").read_text() == sidecar
    assert (images / "a.txt").read_text() == "cat"
    assert (images / "a.caption.txt").read_text() == CAPTION, "the image whose sidecar it is is captioned from it"
    assert any("dog" in user_text(request) for request in llm_server.chat_requests)


def test_a_server_that_ignores_the_schema_fails_the_image_with_the_reason(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Text("A red cat sits on a mat, looking content.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru)

    code, out, err = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 1
    assert "a reply that is not the JSON object asked for (the reply holds no JSON object)" in out + err
    assert "(after 3 attempts); a model that ignores the schema answers prose every time: check that the server " \
           "takes response_format" in out + err
    assert len(llm_server.chat_requests) == 3
    assert (images / "a.txt").read_text() == "cat" and not (images / "a.caption.json").exists()


def test_a_huge_json_reply_is_asked_again_fresh(tmp_path, llm_server, danbooru, capsys):
    huge = json.dumps(dict(GOOD, appearance="fur " * 30_000))
    llm_server.responder = lambda request: Text(huge if len(llm_server.chat_requests) == 1 else json.dumps(GOOD))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, endpoints={"default": {"stream": False}})

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out
    first, second = llm_server.chat_requests
    assert second["messages"] == first["messages"], "asked again without echoing 120 KB back"
    assert (images / "a.txt").read_text() == CAPTION


@pytest.mark.parametrize("schema, message", [
    (None, "cannot read interpreter.response_schema"),
    ("{not json", "is not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    ('["subject"]', "must hold a JSON Schema object"),
    ('{"type": "string"}', 'the schema must be "type": "object" with the caption\'s fields under "properties"'),
    ('{"type": "object", "properties": {"a": {"type": "text"}}}', "properties.a: unknown type 'text'"),
    ('{"type": "object", "properties": {"a": {"type": "string"}}, "minProperties": 1}',
     "the schema uses minProperties, which the built-in validator does not check"),
    ('{"type": "object", "properties": {"a": {"type": "number", "maximum": Infinity}}}',
     "is not valid JSON: Infinity is not a number JSON allows"),
    ('{"type": "object", "properties": {"a": {"type": "number", "minimum": -1e999}}}',
     "is not valid JSON: -1e999 is not a number JSON allows"),
])
def test_a_bad_schema_stops_the_run_before_any_request(tmp_path, llm_server, danbooru, capsys, schema, message):
    if schema is not None:
        (tmp_path / "schema.json").write_text(schema)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, interpreter={"response_schema": "schema.json",
                                                              "response_template": None})

    code, out, err = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert llm_server.chat_requests == []


def test_a_template_naming_a_field_the_schema_lacks_is_refused(tmp_path, llm_server, danbooru, capsys):
    (tmp_path / "template.txt").write_text("{subject} under {lighting}")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, interpreter={"response_template": "template.txt"})

    code, _, err = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 2 and "{lighting} is not a field of the response schema (its fields: subject, appearance" in err


def test_the_dry_run_shows_the_schema_and_the_response_format(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru)

    code, out, _ = run_caption([str(images), "--config", str(path), "--dry-run"], capsys)

    assert code == 0, out
    assert "plan: structured: JSON objects of the schema 'caption' (response_format json_schema" in out
    assert "interpreter requests carry response_format json_schema 'caption' (strict)" in out
    assert "following this JSON Schema" in out
    assert llm_server.chat_requests == [] and not (images / "a.caption.json").exists()


def test_a_server_refusing_response_format_says_what_to_set(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Error(400, {"error": {"message": "Unknown parameter: 'response_format'.",
                                                                 "type": "invalid_request_error"}}) \
        if "response_format" in request else Text(json.dumps(GOOD))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru)

    code, out, err = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 1
    assert "Unknown parameter: 'response_format'" in out + err
    assert "set endpoints.default.structured_output=none" in out + err
    code, out, _ = run_caption([str(images), "--config", str(path), "endpoints.default.structured_output=none"],
                               capsys)
    assert code == 0 and (images / "a.txt").read_text() == CAPTION


def test_check_asks_with_the_response_format_a_run_sends(tmp_path, llm_server, danbooru, capsys):
    """A server that refuses response_format fails every image of a run: check says so first."""
    llm_server.responder = lambda request: Error(400, {"error": {"message": "response_format is not supported",
                                                                 "type": "invalid_request_error"}}) \
        if "response_format" in request else Text("OK")
    path = config(tmp_path, llm_server, danbooru)

    code, out, err = run_caption(["check", "--config", str(path)], capsys)

    assert code == 2, out + err
    schema = json.loads(open(SCHEMA).read())
    asked = [request for request in llm_server.chat_requests if "response_format" in request]
    assert asked and asked[0]["response_format"]["json_schema"]["schema"] == schema
    assert "response_format is not supported" in out
    assert "set endpoints.default.structured_output=none" in out
    assert "Some of what this config needs does not work." in out
    code, out, _ = run_caption(["check", "--config", str(path), "endpoints.default.structured_output=none"], capsys)
    assert code == 0, out


def test_a_number_that_is_not_finite_is_asked_again(tmp_path, llm_server, danbooru, capsys):
    """`1e999` parses as infinity: written out it would make .caption.json invalid JSON, and the
    caption "A girl, inf"."""
    schema = {"type": "object", "properties": {"subject": {"type": "string"}, "score": {"type": "number"}},
              "required": ["subject", "score"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    llm_server.responder = in_turn(llm_server, '{"subject": "a girl", "score": 1e999}',
                                   '{"subject": "a girl", "score": -1E+400}', '{"subject": "a girl", "score": 7.5}')
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "girl"})
    path = config(tmp_path, llm_server, danbooru, interpreter={"response_schema": "schema.json",
                                                              "response_template": None},
                  output={"formats": ["txt", "jsonl"]})

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out
    first, second, third = llm_server.chat_requests
    assert "a number that is not finite (1e999)" in second["messages"][-1]["content"]
    assert "a number that is not finite (-1E+400)" in third["messages"][-1]["content"]
    assert (images / "a.txt").read_text() == "A girl, 7.5"

    def strict(name):
        raise AssertionError(f"{name} written")
    assert json.loads((images / "a.caption.json").read_text(), parse_constant=strict) == {"subject": "a girl",
                                                                                           "score": 7.5}
    assert json.loads((images / "captions.jsonl").read_text(), parse_constant=strict)["structured"]["score"] == 7.5


def test_a_field_whose_name_holds_a_dot_is_written_by_its_whole_name(tmp_path, llm_server, danbooru, capsys):
    schema = {"type": "object", "properties": {"a.b": {"type": "string"},
                                               "camera": {"type": "object", "properties": {"angle": {}}}},
              "required": ["a.b", "camera"], "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "template.txt").write_text("Picture: {a.b}, {camera.angle}.")
    llm_server.responder = lambda request: Text(json.dumps({"a.b": "a red cat", "camera": {"angle": "from below"}}))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    path = config(tmp_path, llm_server, danbooru, interpreter={"response_schema": "schema.json",
                                                              "response_template": "template.txt"})

    code, out, _ = run_caption([str(images), "--config", str(path)], capsys)

    assert code == 0, out
    assert (images / "a.txt").read_text() == "Picture: a red cat, from below."
