"""Issue 14's corpus, part 1 (continued): numbers and `check`. A number out of its range, not
a number, or an override that does not parse is one line and exit 2 when the config is read,
before anything is written or sent; `check` fails, without a traceback or a form of the key,
against a server or a Danbooru that refuses the key or forbids everything, and keeps to the
configured timeout.

The configs come from test_hostile_layout.py, the servers from hostile_servers.py.
"""
from __future__ import annotations

import json
import re

import pytest

from conftest import make_dataset, run_caption
from hostile_servers import (SECRET, Raw, assert_no_secret, booru, finish, llm, no_traceback,  # noqa: F401
                             one_error_line, popen_caption, secret_forms, snapshot, template)
from test_hostile_layout import tags_only

pytestmark = pytest.mark.timeout(60)


# === (4) numbers ================================================================================


NONSENSE = [
    # (override, the key as the message names it, the numbers of its range)
    ("interrogator.max_image_size=-5", "interrogator.max_image_size", ["0"]),
    ("guards.repeat_limit=1", "guards.repeat_limit", ["2"]),
    ("endpoints.default.timeout=-1", "endpoints.default.timeout", ["0"]),
    ("postprocess.max_words=-3", "postprocess.max_words", ["1"]),
    ("endpoints.default.concurrency=1000000", "endpoints.default.concurrency", ["1", "1024"]),
    ("tag_provider.danbooru_concurrency=0", "tag_provider.danbooru_concurrency", ["1"]),
    ("stop_grace=-1", "stop_grace", ["0"]),
    ("file_timeout=0", "file_timeout", ["0"]),
    ("endpoints.default.down_after=0", "endpoints.default.down_after", ["0"]),
    ("endpoints.default.max_retries=-1", "endpoints.default.max_retries", ["0"]),
    ("tag_provider.danbooru_timeout=0", "tag_provider.danbooru_timeout", ["0"]),
    ("tag_provider.danbooru_batch_size=0", "tag_provider.danbooru_batch_size", ["1"]),
    ("tag_provider.danbooru_rate=-2", "tag_provider.danbooru_rate", ["0"]),
    ("guards.max_other_script=2", "guards.max_other_script", ["0", "1"]),
    ("endpoints.default.rest_after=0", "endpoints.default.rest_after", ["1"]),
]
NOT_A_NUMBER = ["endpoints.default.timeout=nan", "file_timeout=nan", "stop_grace=nan",
                "tag_provider.danbooru_timeout=nan"]


@pytest.mark.parametrize("override, key, bounds", NONSENSE, ids=[case[0] for case in NONSENSE])
def test_a_number_out_of_range_is_refused_when_the_config_is_read(tmp_path, llm, booru, capsys, override, key,
                                                                   bounds):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    before = snapshot(images)
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), override], capsys)
    assert code == 2
    line = one_error_line(err, key)
    numbers = re.findall(r"-?\d+(?:\.\d+)?", line.split(key, 1)[1])
    for bound in bounds:
        assert bound in numbers, line
    assert override.split("=", 1)[1] in line  # what was given
    assert snapshot(images) == before and llm.chat_requests == []


@pytest.mark.parametrize("override", NOT_A_NUMBER)
def test_not_a_number_is_refused_when_the_config_is_read(tmp_path, llm, booru, capsys, override):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), override], capsys)
    assert code == 2, out + err
    one_error_line(err, override.split("=", 1)[0])


@pytest.mark.parametrize("override", ["endpoints.default.concurrency=[4", "output.dir={a"])
def test_an_override_that_does_not_parse_is_one_line_and_exit_2(tmp_path, llm, booru, capsys, override):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption([str(images), "--config", str(config), override], capsys)
    assert code == 2, err
    one_error_line(err, override.split("=")[0])


def test_a_number_out_of_range_in_a_config_file_is_refused_by_check_too(tmp_path, llm, booru, capsys):
    config = tags_only(tmp_path, llm, booru, guards={"repeat_limit": 1})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    one_error_line(err, "guards.repeat_limit", "2")
    assert llm.requests == []


# === (7) check ==================================================================================


def test_check_against_a_server_refusing_every_key_fails(tmp_path, llm, booru, capsys):
    llm.refuse_all = True
    config = tags_only(tmp_path, llm, booru, endpoints={"default": {"api_key": SECRET}})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    no_traceback(out, err)
    assert "Everything this config needs works" not in out
    assert "api_key" in out  # the fix names the key to set
    assert_no_secret(secret_forms(SECRET), [out, err])


def test_check_fails_when_only_the_chat_refuses_the_key(tmp_path, llm, booru, capsys):
    llm.hostile = lambda request, headers: Raw(401, json.dumps({"error": {
        "message": f"Incorrect API key provided: {headers.get('authorization')}", "type": "invalid_request_error",
        "code": "invalid_api_key"}}).encode())
    config = tags_only(tmp_path, llm, booru, endpoints={"default": {"api_key": SECRET}})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    no_traceback(out, err)
    assert "Everything this config needs works" not in out
    assert_no_secret(secret_forms(SECRET), [out, err])


def test_check_fails_when_the_server_forbids_everything(tmp_path, llm, booru, capsys):
    llm.hostile = lambda request, headers: Raw(403, b'{"error": {"message": "forbidden"}}')
    llm.models_reply = Raw(403, b'{"error": {"message": "forbidden"}}')
    config = tags_only(tmp_path, llm, booru)
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    no_traceback(out, err)
    assert "Everything this config needs works" not in out


def test_check_fails_when_the_chat_answers_200_with_an_error_object(tmp_path, llm, booru, capsys):
    llm.hostile = lambda request, headers: Raw(200, b'{"error": {"message": "invalid api key", "code": 401}}')
    config = tags_only(tmp_path, llm, booru, endpoints={"default": {"stream": False}})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    no_traceback(out, err)
    assert "Everything this config needs works" not in out
    assert code == 2


def test_check_fails_when_danbooru_refuses_the_login(tmp_path, llm, booru, capsys):
    booru.override = lambda path: (401, {"success": False, "message": "SessionLoader::AuthenticationFailure"},
                                   "application/json")
    config = tags_only(tmp_path, llm, booru, tag_provider={"skip": False, "login": "someone", "api_key": SECRET},
                       interpreter={"prompt_template": template(tmp_path, "TAGS: {tags}\n{tag_descriptions}\n",
                                                                "knowledge.txt")})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    no_traceback(out, err)
    assert "Everything this config needs works" not in out and "tag source" in out
    assert_no_secret(secret_forms(SECRET, "someone"), [out, err])


def test_check_keeps_to_the_configured_timeout(tmp_path, llm, booru):
    from hostile_servers import Hang
    llm.hostile = lambda request, headers: Hang(120)
    config = tags_only(tmp_path, llm, booru, endpoints={"default": {"timeout": 1}})
    code, out, err, seconds = finish(popen_caption(["check", "--config", str(config)]), within=4)
    assert code == 2
    no_traceback(out, err)
    assert "Everything this config needs works" not in out
