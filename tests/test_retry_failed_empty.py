"""`--retry-failed` with nothing to retry is a run with nothing to do: it says why, exit 0."""
from __future__ import annotations

from conftest import make_dataset, run_caption, write_config


def test_an_empty_failures_file_leaves_nothing_to_retry(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    (images / "failures.jsonl").write_text("")
    path = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True})

    code, out, err = run_caption([str(images), "--config", str(path), "--retry-failed"], capsys)

    assert code == 0, out + err
    assert f"nothing to do: {images / 'failures.jsonl'} lists no image: nothing to retry" in out
    assert "is in the folder now" not in out
    assert llm_server.chat_requests == [] and (images / "a.txt").read_text() == "cat"


def test_a_failures_file_naming_images_that_are_gone_says_so(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    (images / "failures.jsonl").write_text(f'{{"image": "{images / "gone.png"}"}}\n')
    path = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True})

    code, out, err = run_caption([str(images), "--config", str(path), "--retry-failed"], capsys)

    assert code == 0, out + err
    assert "is in the folder now: nothing to retry" in out
