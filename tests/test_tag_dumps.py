"""Offline tag knowledge (issue 17, point 1): Danbooru's tables as users download them — a
folder of parquet, CSV or NDJSON files, gzipped or not, dated or sharded — read end to end,
with aliases, implications and names, and no request to Danbooru."""
from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path

import pytest

from conftest import make_dataset, run_caption, run_caption_process, write_config
from fake_servers import user_text
from test_tags import caption_prompts, summarising, summary_requests

pyarrow = pytest.importorskip("pyarrow")
import pyarrow.parquet as parquet  # noqa: E402

WIKI = [
    {"id": 1, "title": "cat", "body": "A [[feline]], small.", "other_names": [], "is_deleted": False},
    {"id": 2, "title": "dog", "body": "Deleted dog.", "other_names": [], "is_deleted": True},
    {"id": 3, "title": "long_hair", "body": "Hair below the shoulders.", "other_names": [], "is_deleted": False},
    {"id": 4, "title": "hatsune_miku", "body": "A [[vocaloid]].", "other_names": ["初音ミク"], "is_deleted": False},
    {"id": 5, "title": "wlop", "body": "A painter.", "other_names": ["WLOP", "王凌"], "is_deleted": False},
    {"id": 6, "title": "kaga_(kantai_collection)", "body": "A carrier.", "other_names": ["加賀"],
     "is_deleted": False},
]
TAGS = [{"id": n, "name": name, "category": category, "post_count": 5000 - n} for n, (name, category) in enumerate([
    ("cat", 0), ("long_hair", 0), ("very_long_hair", 0), ("absurdly_long_hair", 0), ("hatsune_miku", 4),
    ("vocaloid", 3), ("wlop", 1), ("kaga_(kantai_collection)", 4), ("kantai_collection", 3)])]
ALIASES = [{"id": 1, "antecedent_name": "kitty", "consequent_name": "cat", "status": "active"},
           {"id": 2, "antecedent_name": "doggo", "consequent_name": "dog", "status": "deleted"}]
IMPLICATIONS = [
    {"id": 1, "antecedent_name": "very_long_hair", "consequent_name": "long_hair", "status": "active"},
    {"id": 2, "antecedent_name": "absurdly_long_hair", "consequent_name": "very_long_hair", "status": "active"},
    {"id": 3, "antecedent_name": "kaga_(kantai_collection)", "consequent_name": "kantai_collection",
     "status": "active"},
    {"id": 4, "antecedent_name": "cat", "consequent_name": "long_hair", "status": "deleted"}]
TABLES = {"wiki_pages": WIKI, "tags": TAGS, "tag_aliases": ALIASES, "tag_implications": IMPLICATIONS}
IMAGE_TAGS = ("kitty, absurdly_long_hair, long_hair, hatsune_miku, wlop, kaga_(kantai_collection), "
              "kantai_collection, doggo, dog")


def write_table(path: Path, rows: list) -> Path:
    """`rows` as the file its name says: .parquet, .csv (lists and booleans as pandas writes
    them), .ndjson / .jsonl, or .json (a list), gzipped when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        buffer = io.BytesIO()
        parquet.write_table(pyarrow.Table.from_pylist(rows), buffer)
        path.write_bytes(gzip.compress(buffer.getvalue()) if path.name.endswith(".gz") else buffer.getvalue())
        return path
    if name.endswith(".csv"):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({key: repr(value) if isinstance(value, list) else value for key, value in row.items()}
                         for row in rows)
        text = buffer.getvalue()
    elif name.endswith(".json"):
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    else:
        text = "\n".join(json.dumps(row, ensure_ascii=False) for row in rows) + "\n"
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


@pytest.fixture
def template(tmp_path):
    path = tmp_path / "template.txt"
    path.write_text("TAGS<{tags}>\nBOORU<{booru_tags}>\nGENERAL<{general_tags}>\nCHARACTERS<{character_names}>\n"
                    "SERIES<{copyright_names}>\nARTISTS<{artist_names}>\nKNOWN<{tag_descriptions}>\n")
    return path


def offline_run(tmp_path, llm_server, danbooru, template, capsys, image_tags=IMAGE_TAGS, **tag_provider):
    llm_server.responder = summarising
    images = tmp_path / "images"
    make_dataset(images, {"a.png": image_tags})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          tag_provider={"source": "file", **tag_provider},
                          interpreter={"prompt_template": str(template)})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out + err
    assert danbooru.requests == []
    return caption_prompts(llm_server)[0], out, err


def assert_offline_knowledge(prompt: str, llm_server) -> None:
    # kitty is cat (alias); long hair is implied by absurdly long hair (through very long hair);
    # the series stays though the character implies it; a deleted alias and a deleted page count for nothing.
    assert "TAGS<cat, absurdly long hair, hatsune miku, wlop, kaga (kantai collection), kantai collection, doggo, " \
           "dog>" in prompt
    assert f"BOORU<{IMAGE_TAGS}>" in prompt
    assert "CHARACTERS<Hatsune Miku, Kaga (Kantai Collection)>" in prompt
    assert "SERIES<Kantai Collection>" in prompt and "ARTISTS<WLOP>" in prompt
    assert "cat: Means cat." in prompt and "long hair:" not in prompt
    assert sorted(summary_requests(llm_server)) == ["cat", "hatsune miku", "kaga (kantai collection)", "long hair",
                                                    "wlop"]
    cat = next(user_text(r) for r in llm_server.chat_requests if 'Tag: "cat"' in user_text(r))
    assert "A feline, small." in cat


@pytest.mark.parametrize("extension", ["parquet", "parquet.gz", "csv", "csv.gz", "ndjson.gz", "jsonl", "json"])
def test_a_dump_folder_in_each_format(tmp_path, llm_server, danbooru, template, capsys, extension):
    dump = tmp_path / "danbooru_wikis_full"
    for table, rows in TABLES.items():
        write_table(dump / f"{table}.{extension}", rows)
    write_table(dump / f"tag_groups.{extension}", [{"title": "tag_group:hair", "body": "* [[cat]]"}])
    (dump / "README.md").write_text("---\nlicense: mit\n---\n")
    prompt, _, _ = offline_run(tmp_path, llm_server, danbooru, template, capsys, dump_dir="danbooru_wikis_full")
    assert_offline_knowledge(prompt, llm_server)
    cache = json.loads((tmp_path / "tags_cache.json").read_text())["tags"]
    assert cache["cat"]["source"]["from"] == "dump" and cache["cat"]["source"]["file"] == f"wiki_pages.{extension}"
    assert cache["kitty"]["alias_of"] == "cat" and cache["absurdly_long_hair"]["implies"] == ["long_hair",
                                                                                               "very_long_hair"]


def test_dated_sharded_and_nested_files_are_found_by_name(tmp_path, llm_server, danbooru, template, capsys):
    """Danbooru's export shards a table into numbered files of a folder; e621-style dumps date
    their names; the first format found is read once (parquet beside its CSV copy)."""
    dump = tmp_path / "dump"
    write_table(dump / "wiki_pages" / "000000000000.json", WIKI[:3])
    write_table(dump / "wiki_pages" / "000000000001.json", WIKI[3:])
    write_table(dump / "tags-2024-04-07.csv.gz", TAGS)
    write_table(dump / "tags-2024-04-07.parquet", TAGS)
    write_table(dump / "data" / "tag_aliases-000.ndjson", ALIASES)
    write_table(dump / "tag_implications.jsonl", IMPLICATIONS)
    write_table(dump / ".cache" / "huggingface" / "tags.csv", [{"name": "cat", "category": 4}])
    prompt, _, _ = offline_run(tmp_path, llm_server, danbooru, template, capsys, dump_dir=str(dump))
    assert_offline_knowledge(prompt, llm_server)
    source = json.loads((tmp_path / "tags_cache.json").read_text())["tags"]["cat"]["source"]
    assert source["file"] == "wiki_pages/ (2 files)"


def test_a_wiki_only_parquet_named_otherwise_is_found_by_its_columns(tmp_path, llm_server, danbooru, template,
                                                                    capsys):
    """isek-ai/danbooru-wiki-2024: `data/train-00000-of-00001.parquet`, the category as a word."""
    rows = [{"title": "hatsune_miku", "body": "A singer.", "category": "character", "other_names": ["Hatsune_Miku"]},
            {"title": "vocaloid", "body": "Software.", "category": "copyright", "other_names": None}]
    write_table(tmp_path / "wiki" / "data" / "train-00000-of-00001.parquet", rows)
    prompt, _, _ = offline_run(tmp_path, llm_server, danbooru, template, capsys, "hatsune_miku, vocaloid",
                               dump_dir="wiki")
    assert "CHARACTERS<Hatsune Miku>" in prompt and "SERIES<Vocaloid>" in prompt


def test_wiki_dump_and_tags_dump_accept_parquet_and_win_over_the_folder(tmp_path, llm_server, danbooru, template,
                                                                       capsys):
    write_table(tmp_path / "mine" / "pages.parquet", WIKI)
    write_table(tmp_path / "mine" / "tag_table.parquet", TAGS)
    write_table(tmp_path / "dump" / "wiki_pages.csv", [{"title": "cat", "body": "Not this one."}])
    write_table(tmp_path / "dump" / "tag_aliases.csv", ALIASES)
    prompt, _, _ = offline_run(tmp_path, llm_server, danbooru, template, capsys, dump_dir="dump",
                               wiki_dump="mine/pages.parquet", tags_dump="mine/tag_table.parquet")
    assert "CHARACTERS<Hatsune Miku, Kaga (Kantai Collection)>" in prompt and "TAGS<cat," in prompt
    assert "A feline, small." in next(user_text(r) for r in llm_server.chat_requests if 'Tag: "cat"' in user_text(r))


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, llm_server, danbooru):
    shim = tmp_path / "no_pyarrow" / "pyarrow"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError(\"No module named 'pyarrow'\")\n")
    write_table(tmp_path / "dump" / "wiki_pages.parquet", WIKI)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          tag_provider={"source": "file", "dump_dir": "dump"})
    result = run_caption_process([str(images), "--config", str(config), "--no-progress"],
                                 PYTHONPATH=str(shim.parent))
    assert result.returncode == 2, result.stderr
    assert "wiki_pages.parquet is a parquet file, which needs pyarrow: pip install .[parquet]" in result.stderr
    assert "Traceback" not in result.stderr and not (images / "a.tags.txt").exists()


@pytest.mark.parametrize("setting, files, expected", [
    ({"dump_dir": "dump"}, {"tags.csv": TAGS}, "tag_provider.dump_dir: no wiki_pages table in"),
    ({"dump_dir": "nowhere"}, {}, "tag_provider.dump_dir:"),
    ({}, {}, "neither tag_provider.dump_dir nor tag_provider.wiki_dump is set"),
    ({"dump_dir": "dump"}, {"wiki_pages.csv": [{"name": "cat", "text": "x"}]}, "no title or body column"),
    ({"dump_dir": "dump", "source": "danbooru"}, {"wiki_pages.csv": WIKI}, "set tag_provider.source: file"),
])
def test_a_dump_that_cannot_be_used_is_a_setup_error(tmp_path, llm_server, danbooru, template, capsys, setting,
                                                    files, expected):
    for name, rows in files.items():
        write_table(tmp_path / "dump" / name, rows)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          tag_provider={"source": "file", **setting})
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 2 and expected in err, err
    assert danbooru.requests == []


@pytest.mark.timeout(30)
def test_aliases_in_a_cycle_neither_hang_nor_loop(tmp_path, llm_server, danbooru, template, capsys):
    write_table(tmp_path / "dump" / "wiki_pages.ndjson", [{"title": "cat", "body": "A cat."},
                                                         {"title": "kitty", "body": "A kitten."}])
    write_table(tmp_path / "dump" / "tag_aliases.ndjson", [
        {"antecedent_name": "cat", "consequent_name": "kitty", "status": "active"},
        {"antecedent_name": "kitty", "consequent_name": "cat", "status": "active"},
        {"antecedent_name": "self", "consequent_name": "self", "status": "active"}])
    prompt, _, _ = offline_run(tmp_path, llm_server, danbooru, template, capsys, "cat, kitty, self", dump_dir="dump")
    assert prompt.startswith("TAGS<") and "self" in prompt


def test_a_broken_ndjson_line_is_named(tmp_path, llm_server, danbooru, capsys):
    (tmp_path / "dump").mkdir()
    (tmp_path / "dump" / "wiki_pages.ndjson").write_text('{"title": "cat", "body": "A cat."}\n{"title": "do\n')
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          tag_provider={"source": "file", "dump_dir": "dump"})
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 2 and "wiki_pages.ndjson: line 2 is not JSON" in err, err
