"""`--dataset`: Hugging Face datasets captioned end to end against the loopback servers.

Every dataset is built here (`Dataset.from_dict` with generated images, `save_to_disk`, a
parquet file); the Hub is never asked: offline mode is on for the whole session and its
address points at a closed port on 127.0.0.1.
"""
from __future__ import annotations

import atexit
import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from PIL import Image

_CACHE = tempfile.mkdtemp(prefix="tagcaption-hf-cache-")
atexit.register(shutil.rmtree, _CACHE, True)
for _key, _value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9",
                     "HF_HOME": _CACHE, "HF_DATASETS_CACHE": _CACHE}.items():
    os.environ.setdefault(_key, _value)  # before `datasets` is imported: it reads them once

datasets = pytest.importorskip("datasets")

from conftest import ROOT, run_caption, run_caption_process, write_config  # noqa: E402
from fake_servers import Error, Text, user_text  # noqa: E402

from tagcaption import cli  # noqa: E402

TAG = re.compile(r"\btag(\d+)\b")


def picture(n: int) -> Image.Image:
    return Image.new("RGB", (40, 30), (20 + 7 * n % 230, 90, 160))


def rows_dataset(count: int, tags=None, images=None, **columns):
    """`count` rows: a generated image (or `images`), tags `tag<n>` (or `tags(n)`), an im_name,
    and more columns."""
    data = {"image": images or [picture(n) for n in range(count)],
            "tags": [tags(n) if tags else f"tag{n}, solo" for n in range(count)],
            "im_name": [f"im_{n:03}.png" for n in range(count)], **columns}
    return datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())


def caption_for(request: dict):
    """The caption names the row's tag, so each row's caption can be checked."""
    found = TAG.findall(user_text(request))
    return Text(f"A picture of tag{found[-1]}." if found else "A picture.")


def config_for(tmp_path, llm_server, danbooru, **sections):
    return write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                        dataset={"tags_column": "tags", "id_column": "im_name", **sections.pop("dataset", {})},
                        **sections)


def captions(path: Path) -> dict:
    loaded = datasets.load_from_disk(str(path))
    return dict(zip(loaded["im_name"], loaded["caption"]))


def caption_requests(server) -> list:
    return [request for request in server.chat_requests if "one sentence" not in user_text(request)]


def test_saved_dataset_is_captioned_and_saved_with_its_columns(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = caption_for
    source = tmp_path / "source"
    booru = {1: "tag1, long_hair", 2: "tag2 red_hair smile", 3: "tag3\nblue eyes"}
    rows_dataset(5, tags=lambda n: booru.get(n, f"tag{n}")).save_to_disk(str(source))
    out = tmp_path / "out"
    config = config_for(tmp_path, llm_server, danbooru, dataset={"output_path": str(out), "save_interval": 2})

    code, stdout, err = run_caption(["--dataset", str(source), "--config", str(config)], capsys)
    assert code == 0, stdout + err
    assert "5 captioned" in stdout and f"Captions: the dataset in {out}" in stdout
    loaded = datasets.load_from_disk(str(out))
    assert loaded.column_names == ["image", "tags", "im_name", "caption"]
    assert loaded["im_name"] == [f"im_{n:03}.png" for n in range(5)]
    assert loaded["caption"] == [f"A picture of tag{n}." for n in range(5)]
    assert list(loaded[3]["image"].getdata()) == list(picture(3).getdata())  # the image as it was, lossless
    prompts = {n: user_text(request) for request in caption_requests(llm_server)
               for n in [int(TAG.findall(user_text(request))[-1])]}
    assert "long hair" in prompts[1] and "red hair, smile" in prompts[2] and "blue eyes" in prompts[3]
    assert {"red_hair", "smile", "long_hair"} <= set(danbooru.looked_up())
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert sorted(record["id"] for record in records) == [f"im_{n:03}.png" for n in range(5)]
    assert (out / ".tagcaption" / "lock").read_text() == ""
    assert not [p for p in tmp_path.rglob("*") if p.suffix in (".png", ".jpg")]  # no image written to disk

    code, stdout, _ = run_caption(["--dataset", str(source), "--config", str(config)], capsys)
    assert code == 0 and "all 5 rows have captions" in stdout
    assert len(caption_requests(llm_server)) == 5


def test_parquet_streamed_through_vision_keeps_descriptions(tmp_path, llm_server, danbooru, capsys):
    llm_server.models.append("vision-model")
    rows_dataset(4, tags=lambda n: [f"tag{n}", "1girl"]).to_parquet(str(tmp_path / "rows.parquet"))
    out = tmp_path / "captioned"
    config = config_for(tmp_path, llm_server, danbooru, interrogator={"skip": False},
                        dataset={"output_path": str(out), "streaming": True, "id_column": None})

    code, stdout, err = run_caption(["--dataset", str(tmp_path / "rows.parquet"), "--config", str(config)], capsys)
    assert code == 0, stdout + err
    vision = [r for r in llm_server.chat_requests if r["model"] == "vision-model"]
    assert len(vision) == 4
    url = vision[0]["messages"][-1]["content"][1]["image_url"]["url"]
    assert url.startswith(("data:image/jpeg;base64,", "data:image/png;base64,"))
    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (40, 30)
    loaded = datasets.load_from_disk(str(out))
    assert loaded.column_names == ["image", "tags", "im_name", "caption", "description"]
    assert loaded["tags"][2] == ["tag2", "1girl"]
    assert len(set(loaded["description"])) == 4 and all("vision-model" in d for d in loaded["description"])
    interpreted = [user_text(r) for r in llm_server.chat_requests if r["model"] == "instruct-model"]
    assert all(any(d in text for text in interpreted) for d in loaded["description"])
    records = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    assert sorted(record["id"] for record in records) == ["0", "1", "2", "3"]  # the row index without id_column


def test_killed_run_is_continued_from_its_parts(tmp_path, llm_server, danbooru):
    llm_server.responder = caption_for
    llm_server.delay = 0.03
    count = 40
    source = tmp_path / "source"
    rows_dataset(count).save_to_disk(str(source))
    out = tmp_path / "out"
    config = config_for(tmp_path, llm_server, danbooru, endpoints={"default": {"concurrency": 2}},
                        dataset={"output_path": str(out), "save_interval": 5})
    args = ["--no-progress", "--dataset", str(source), "--config", str(config)]
    process = subprocess.Popen([sys.executable, str(ROOT / "caption.py"), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)
    parts = out / ".tagcaption" / "parts"
    deadline = time.monotonic() + 30
    while not list(parts.glob("part-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.kill()
    process.communicate()
    first = len(caption_requests(llm_server))
    assert 5 <= first < count

    rerun = run_caption_process(args)
    assert rerun.returncode == 0, rerun.stderr
    assert "skipped (caption exists)" in rerun.stdout
    # A row the killed run had in flight is asked again; no row it had captioned is.
    assert len(caption_requests(llm_server)) <= count + 2 * 2
    loaded = datasets.load_from_disk(str(out))
    assert loaded["im_name"] == [f"im_{n:03}.png" for n in range(count)]
    assert loaded["caption"] == [f"A picture of tag{n}." for n in range(count)]
    assert not list(parts.iterdir()) and not (out / ".tagcaption" / "joining").exists()


def test_interrupted_stream_saves_its_rows_and_the_rerun_joins_them(tmp_path, llm_server, danbooru):
    llm_server.responder = caption_for
    llm_server.delay = 0.05
    count = 30
    rows_dataset(count).to_parquet(str(tmp_path / "rows.parquet"))
    out = tmp_path / "out"
    config = config_for(tmp_path, llm_server, danbooru, endpoints={"default": {"concurrency": 2}},
                        dataset={"output_path": str(out), "streaming": True, "save_interval": 100})
    args = ["--no-progress", "--dataset", str(tmp_path / "rows.parquet"), "--config", str(config)]
    process = subprocess.Popen([sys.executable, str(ROOT / "caption.py"), *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=ROOT)
    journal = out / "captions.jsonl"
    deadline = time.monotonic() + 30
    while not (journal.exists() and len(journal.read_text().splitlines()) >= 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, err = process.communicate(timeout=30)
    assert process.returncode == 130, err
    assert "Summary" in stdout and "Next: rerun the same command" in stdout and "saved in parts" in err
    assert len(list((out / ".tagcaption" / "parts").glob("part-*"))) == 1 and not (out / "state.json").exists()

    rerun = run_caption_process(args)
    assert rerun.returncode == 0, rerun.stderr
    assert len(caption_requests(llm_server)) <= count + 2 * 2
    loaded = datasets.load_from_disk(str(out))
    assert loaded["caption"] == [f"A picture of tag{n}." for n in range(count)]
    assert loaded.features["image"] == datasets.Image() and loaded[7]["image"].size == (40, 30)


def test_captions_already_in_the_dataset_are_kept_unless_overwrite(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = caption_for
    source = tmp_path / "source"
    rows_dataset(4, caption=["Their own caption.", None, "  ", "Another one."]).save_to_disk(str(source))
    config = config_for(tmp_path, llm_server, danbooru)

    code, stdout, _ = run_caption(["--dataset", str(source), "--config", str(config),
                                   f"dataset.output_path={tmp_path / 'kept'}"], capsys)
    assert code == 0 and "2 captioned, 2 skipped" in stdout
    assert captions(tmp_path / "kept") == {"im_000.png": "Their own caption.", "im_001.png": "A picture of tag1.",
                                           "im_002.png": "A picture of tag2.", "im_003.png": "Another one."}
    code, stdout, _ = run_caption(["--dataset", str(source), "--config", str(config), "output.overwrite=true",
                                   f"dataset.output_path={tmp_path / 'fresh'}"], capsys)
    assert code == 0 and "4 captioned" in stdout
    assert set(captions(tmp_path / "fresh").values()) == {f"A picture of tag{n}." for n in range(4)}


def test_failed_rows_are_listed_and_retried(tmp_path, llm_server, danbooru, capsys):
    refuse = {"tag3"}

    def respond(request):
        if refuse & set(f"tag{n}" for n in TAG.findall(user_text(request))):
            return Error(400, {"error": {"message": "bad request", "type": "invalid_request_error"}})
        return caption_for(request)
    llm_server.responder = respond
    images = [picture(n) for n in range(5)]
    images[2] = {"bytes": b"this is not an image", "path": None}
    source = tmp_path / "source"
    rows_dataset(5, tags=lambda n: "" if n == 4 else f"tag{n}", images=images).save_to_disk(str(source))
    out = tmp_path / "out"
    config = config_for(tmp_path, llm_server, danbooru, dataset={"output_path": str(out)})

    code, stdout, _ = run_caption(["--dataset", str(source), "--config", str(config)], capsys)
    assert code == 1 and "2 captioned" in stdout and "3 failed" in stdout
    failures = {f["image"]: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert failures["im_002.png"]["stage"] == "input" and "not a readable image" in failures["im_002.png"]["message"]
    assert failures["im_003.png"]["kind"] == "http_400"
    assert "its tags column is empty" in failures["im_004.png"]["message"]
    assert sorted(captions(out)) == ["im_000.png", "im_001.png"]

    refuse.clear()
    code, stdout, _ = run_caption(["--dataset", str(source), "--config", str(config), "--retry-failed"], capsys)
    assert code == 1 and "1 captioned" in stdout and "2 failed" in stdout
    assert captions(out)["im_003.png"] == "A picture of tag3."
    assert sorted(f["image"] for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())) == \
        ["im_002.png", "im_004.png"]


def test_shards_caption_their_own_rows_and_are_joined(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = caption_for
    source = tmp_path / "source"
    rows_dataset(12).save_to_disk(str(source))
    config = config_for(tmp_path, llm_server, danbooru)
    shares = []
    for k in (1, 2):
        code, stdout, _ = run_caption(["--dataset", str(source), "--config", str(config), "--shard", f"{k}/2",
                                       f"dataset.output_path={tmp_path / f'out-{k}'}"], capsys)
        assert code == 0, stdout
        shares.append(set(captions(tmp_path / f"out-{k}")))
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == {f"im_{n:03}.png" for n in range(12)}
    code, _, err = run_caption(["--dataset", str(source), "--config", str(config), "--shard", "2/2",
                                f"dataset.output_path={tmp_path / 'out-1'}"], capsys)
    assert code == 2 and "holds the rows of shard 1/2" in err

    joined = tmp_path / "joined"
    assert cli.main(["join", str(tmp_path / "out-1"), str(tmp_path / "out-2"), "--into", str(joined)]) == 0
    loaded = datasets.load_from_disk(str(joined))
    assert loaded["im_name"] == [f"im_{n:03}.png" for n in range(12)]  # in the source's order
    assert loaded["caption"] == [f"A picture of tag{n}." for n in range(12)]
    code, stdout, _ = run_caption(["--dataset", str(source), "--config", str(config),
                                   f"dataset.output_path={joined}"], capsys)
    assert code == 0 and "all 12 rows have captions" in stdout


def test_sample_and_dry_run(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = caption_for
    source = tmp_path / "source"
    rows_dataset(6).save_to_disk(str(source))
    out = tmp_path / "out"
    config = config_for(tmp_path, llm_server, danbooru, dataset={"output_path": str(out)})

    code, stdout, _ = run_caption(["--dataset", str(source), "--config", str(config), "--dry-run"], capsys)
    assert code == 0 and "Dry run" in stdout and "=== im_000.png ===" in stdout and "6 images would be" in stdout
    assert not out.exists() and not caption_requests(llm_server)
    code, stdout, _ = run_caption(["--dataset", str(source), "--config", str(config), "--sample", "2"], capsys)
    assert code == 0 and "2 captioned" in stdout
    assert len(captions(out)) == 2


def test_name_column_fills_the_seeds_name_option(tmp_path, llm_server, danbooru, capsys):
    llm_server.models.append("vision-model")
    source = tmp_path / "source"
    rows_dataset(2, character=["Ganyu", ""]).save_to_disk(str(source))
    config = config_for(tmp_path, llm_server, danbooru, interrogator={"skip": False}, interpreter={"skip": True},
                        style={"name": "the girl", "length": "long",
                               "extra_options": ["name", "no_unchangeable", "no_resolution"]},
                        dataset={"output_path": str(tmp_path / "out"), "name_column": "character"})
    code, stdout, _ = run_caption(["--dataset", str(source), "--config", str(config), "--style", "descriptive"],
                                  capsys)
    assert code == 0, stdout
    prompts = sorted(request["messages"][-1]["content"][0]["text"] for request in llm_server.chat_requests)
    assert prompts[0].startswith("Write a long descriptive caption for this image in a formal tone. If there is a "
                                 "person/character in the image you must refer to them as Ganyu. Do NOT include "
                                 "information about people/characters that cannot be changed")
    assert prompts[0].endswith("Do NOT mention the image's resolution.")
    assert "refer to them as the girl." in prompts[1]


def test_what_a_dataset_run_refuses(tmp_path, llm_server, danbooru, capsys):
    source = tmp_path / "source"
    rows_dataset(2).save_to_disk(str(source))
    config = config_for(tmp_path, llm_server, danbooru)
    refused = {
        "is not a column of": ["dataset.image_column=picture"],
        "--sample picks among all the rows": ["dataset.streaming=true", "--sample", "1"],
        "give either IMAGES_DIR": [str(tmp_path)],
        "interrogator.hint_sources: exif": ["interrogator.hint_sources=[exif]"],
        "would replace what they are made from": ["dataset.caption_column=tags"],
    }
    for message, extra in refused.items():
        code, _, err = run_caption(["--dataset", str(source), "--config", str(config), *extra], capsys)
        assert code == 2 and message in err, (message, err)
    code, _, err = run_caption(["--dataset", "someone/no-such-dataset", "--config", str(config)], capsys)
    assert code == 2 and "cannot read the dataset someone/no-such-dataset" in err
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    code, _, err = run_caption(["--dataset", str(source), "--config", str(config),
                                f"dataset.output_path={foreign}"], capsys)
    assert code == 2 and "holds files tagcaption did not write" in err
    assert not caption_requests(llm_server)

    without = tmp_path / "without-datasets" / "datasets"
    without.mkdir(parents=True)
    (without / "__init__.py").write_text("raise ImportError('datasets is not installed here')\n")
    result = run_caption_process(["--dataset", str(source), "--config", str(config)],
                                 PYTHONPATH=str(without.parent))
    assert result.returncode == 2 and "pip install '.[datasets]'" in result.stderr
    assert "Traceback" not in result.stderr


def test_variants_fill_the_caption_column_one_a_line(tmp_path, llm_server, danbooru, capsys):
    """`output.variants` with --dataset: the caption column holds the lines as a .txt would, and
    captions.jsonl has each row's list of them; a structured caption's object is there too."""
    schema = {"type": "object", "properties": {"subject": {"type": "string"}}, "required": ["subject"],
              "additionalProperties": False}
    (tmp_path / "schema.json").write_text(json.dumps(schema))

    def respond(request):
        tag = TAG.findall(user_text(request))[-1]
        return Text(json.dumps({"subject": f"tag{tag}, take {request['seed']}"}))
    llm_server.responder = respond
    source = tmp_path / "source"
    rows_dataset(2).save_to_disk(str(source))
    out = tmp_path / "out"
    config = config_for(tmp_path, llm_server, danbooru, dataset={"output_path": str(out)}, output={"variants": 2},
                        interpreter={"response_schema": "schema.json"}, tag_provider={"source": "none"})

    code, stdout, err = run_caption(["--dataset", str(source), "--config", str(config)], capsys)

    assert code == 0, stdout + err
    assert captions(out) == {f"im_{n:03}.png": f"Tag{n}, take 0\nTag{n}, take 1" for n in range(2)}
    records = {record["id"]: record for record in map(json.loads, (out / "captions.jsonl").read_text().splitlines())}
    assert records["im_001.png"]["variants"] == ["Tag1, take 0", "Tag1, take 1"]
    assert records["im_001.png"]["structured"] == [{"subject": "tag1, take 0"}, {"subject": "tag1, take 1"}]
