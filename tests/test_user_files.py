"""Files and names of the user's that the outputs must respect: a metadata.jsonl with columns of
its own, an output.dir that is the images folder itself, names that are not UTF-8 under
--shard, and a review page over a caption path that is not a regular file."""
from __future__ import annotations

import json
import os

from conftest import make_dataset, make_image, run_caption, write_config
from fake_servers import Text


def config_for(tmp_path, llm_server, danbooru, **sections):
    return write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                        **sections)


def test_a_metadata_jsonl_keeps_the_users_own_columns(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "red_square", "b.png": "blue_square"})
    (images / "metadata.jsonl").write_text(json.dumps({"file_name": "a.png", "aesthetic": 6.5, "source": "pixiv 1",
                                                       "text": "hand written"}) + "\n")
    llm_server.responder = lambda request: Text("A square.")
    config = config_for(tmp_path, llm_server, danbooru, output={"extension": ".caption",
                                                                "formats": ["txt", "metadata"]})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, err
    lines = {line["file_name"]: line for line in map(json.loads, (images / "metadata.jsonl").read_text().splitlines())}
    assert lines["a.png"] == {"file_name": "a.png", "aesthetic": 6.5, "source": "pixiv 1", "text": "A square.",
                              "tags": "red square"}
    assert lines["b.png"]["text"] == "A square." and "aesthetic" not in lines["b.png"]


def test_an_output_dir_that_is_the_images_folder_is_captions_beside_the_images(tmp_path, llm_server, danbooru,
                                                                                capsys):
    """a.tags.png's caption would be a.png's kept tags (a.tags.txt): refused with or without
    output.dir naming the same folder."""
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "red_square"})
    make_image(images / "a.tags.png")
    llm_server.responder = lambda request: Text("A red square.")
    config = config_for(tmp_path, llm_server, danbooru, output={"dir": str(images)})
    for _ in range(2):
        code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert (images / "a.tags.txt").read_text() == "red_square"
    assert (images / "a.txt").read_text() == "A red square." and not (images / "a.tags.tags.txt").exists()


def test_a_shard_of_a_folder_with_a_name_that_is_not_utf8(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    images.mkdir()
    odd = os.fsdecode(b"caf\xe9")
    for name in (odd, "b", "c", "d"):
        make_image(images / f"{name}.png")
        (images / f"{name}.txt").write_text("red_square")
    llm_server.responder = lambda request: Text("A red square.")
    config = config_for(tmp_path, llm_server, danbooru, output={"extension": ".caption"})
    captioned = 0
    for shard in ("1/2", "2/2"):
        code, out, err = run_caption([str(images), "--config", str(config), "--shard", shard], capsys)
        assert code == 0 and "unexpected" not in err, err
    captioned = len(list(images.glob("*.caption")))
    assert captioned == 4


def test_the_review_page_survives_a_caption_path_that_is_a_fifo(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "red_square", "b.png": "blue_square"})
    os.mkfifo(images / "a.caption")
    llm_server.responder = lambda request: Text("A square.")
    config = config_for(tmp_path, llm_server, danbooru, output={"extension": ".caption"})
    run_caption([str(images), "--config", str(config)], capsys)
    code, out, err = run_caption(["report", str(images), "--config", str(config)], capsys)
    assert code == 0, err
    page = (images / "captions.html").read_text()
    assert "cannot read its caption" in page and "A square." in page


def test_records_a_run_could_not_write_are_written_by_the_next_even_with_nothing_to_caption(tmp_path, llm_server,
                                                                                           danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "red_square"})
    (images / "metadata.jsonl").mkdir()  # the dataset file cannot be written this time
    llm_server.responder = lambda request: Text("A red square.")
    config = config_for(tmp_path, llm_server, danbooru, output={"extension": ".caption",
                                                                "formats": ["txt", "metadata"]})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert "the next run merges this run's records" in err
    (images / "metadata.jsonl").rmdir()
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "nothing to do" in out + err
    (line,) = (images / "metadata.jsonl").read_text().splitlines()
    assert json.loads(line)["text"] == "A red square."


def test_a_placeholder_api_key_is_no_secret(tmp_path, llm_server, danbooru, capsys):
    """Local servers take any key; "none" or "lm-studio" in a caption is a word, not a leak."""
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "red_square"})
    llm_server.responder = lambda request: Text("A red square, none of it blue, lit like lm-studio.")
    for key in ("none", "lm-studio"):
        config = config_for(tmp_path, llm_server, danbooru, output={"extension": f".{key}"},
                            endpoints={"default": {"api_key": key}})
        code, out, err = run_caption([str(images), "--config", str(config)], capsys)
        assert code == 0, err
        assert (images / f"a.{key}").read_text() == "A red square, none of it blue, lit like lm-studio."
