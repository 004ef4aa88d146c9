"""The run's parts tested at their seams: the selection, the captioner and the writer, each
built from a real config over a real folder (and, for the captioner, the loopback server)."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import List

import pytest

from tagcaption.captioner import Captioned, Captioner
from tagcaption.config import load_config
from tagcaption.errors import CaptionAppeared, CaptionCollision, ImageError, ImageProblem, NothingToCaption
from tagcaption.folder import Folder
from tagcaption.layout import Layout
from tagcaption.selection import Selection, Shard
from tagcaption.stages import build_stages
from tagcaption.tagfiles import ImageTags
from tagcaption.tally import Tally
from tagcaption.writer import Writer
from conftest import make_dataset, write_config


def config_for(tmp_path: Path, images: Path, *overrides: str, url: str = "http://127.0.0.1:9/v1"):
    path = write_config(tmp_path / "config.yaml", url, "http://127.0.0.1:9", tag_provider={"skip": True})
    return load_config(str(path), list(overrides), str(images))


def select(config, **options) -> tuple:
    layout = Layout(config, options.get("shard", Shard()).suffix)
    tally, failed = Tally(), []
    selection = Selection(layout, Folder(layout.images_root, config.recursive), tally,
                          lambda item, problem: failed.append((item.rel.as_posix(), problem)),
                          overwrite=config.output.overwrite, **options)

    async def walk() -> List[str]:
        return [rel async for rel in selection.walk()]
    return asyncio.run(walk()), tally, failed


def test_the_selection_skips_captioned_images_and_fails_collisions(tmp_path):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog", "c.png": "x", "c.jpg": "y", "d.png": "z",
                          "d.tags.png": "w"})
    (images / "b.caption").write_text("A dog.", encoding="utf-8")
    config = config_for(tmp_path, images, "output.extension=.caption")
    found, tally, failed = select(config)
    assert found == ["a.png", "c.jpg", "d.png", "d.tags.png"]
    assert tally["images.skipped"] == 1 and tally["images.pending"] == 4
    assert [(rel, type(problem)) for rel, problem in failed] == [("c.png", CaptionCollision)]

    found, tally, failed = select(config_for(tmp_path, images))  # captions in <stem>.txt: a.tags.png's is a.tags.txt
    assert ("d.tags.png", CaptionCollision) in [(rel, type(problem)) for rel, problem in failed]


def test_the_selection_shares_a_folder_between_shards_without_overlap(tmp_path):
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": "cat" for n in range(40)})
    config = config_for(tmp_path, images)
    shares = [select(config, shard=Shard(k, 3))[0] for k in (1, 2, 3)]
    assert sorted(sum(shares, [])) == [f"{n:02}.png" for n in range(40)]
    assert all(shares)


def test_a_sample_is_the_same_for_a_seed(tmp_path):
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": "cat" for n in range(30)})
    config = config_for(tmp_path, images)
    first, second = (select(config, sample=5, seed=7)[0] for _ in range(2))
    assert first == second and len(first) == 5


def caption_one(config, image: Path, tags: List[str]):
    stages = build_stages(config, Tally())
    captioner = Captioner(config, Layout(config), stages)

    async def go():
        try:
            item, _ = await captioner.prepare(image.name)
            return await captioner.caption(item, ImageTags(tags), {})
        finally:
            await stages.close()
    return asyncio.run(go())


def test_the_captioner_writes_nothing_and_names_the_stage_that_failed(tmp_path, llm_server):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    config = config_for(tmp_path, images, url=llm_server.base_url)
    captioned = caption_one(config, images / "a.png", ["cat"])
    assert captioned.caption.startswith("Reply ") and captioned.record["tags"] == "cat"
    assert sorted(p.name for p in images.iterdir()) == ["a.png", "a.txt", "broken.png"]
    with pytest.raises(NothingToCaption) as nothing:
        caption_one(config, images / "a.png", [])
    with pytest.raises(ImageError) as broken:
        caption_one(config, images / "broken.png", ["cat"])
    assert nothing.value.stage == broken.value.stage == "input"
    assert len(llm_server.chat_requests) == 1


def write_one(config, image: Path, caption: str) -> Tally:
    layout = Layout(config)
    tally = Tally()
    writer = Writer(config, layout, Folder(layout.images_root, False), tally)
    writer.start()
    try:
        item = layout.item(image)
        asyncio.run(writer.write(Captioned(item, caption, {"file": item.rel.as_posix(), "caption": caption})))
    finally:
        writer.close()
    return tally


def test_the_writer_keeps_tags_and_hand_edits_before_replacing_them(tmp_path):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat, dog"})
    original = (images / "a.txt").read_bytes()
    config = config_for(tmp_path, images)
    assert write_one(config, images / "a.png", "A cat and a dog.")["images.captioned"] == 1
    assert (images / "a.tags.txt").read_bytes() == original
    assert (images / "a.txt").read_text() == "A cat and a dog."

    (images / "a.txt").write_text("Edited by hand.", encoding="utf-8")
    with pytest.raises(ImageProblem) as appeared:  # not ours, and overwrite is off
        write_one(config, images / "a.png", "Another caption.")
    assert isinstance(appeared.value, CaptionAppeared) and appeared.value.stage == "output"
    tally = write_one(config_for(tmp_path, images, "output.overwrite=true"), images / "a.png", "Another caption.")
    assert tally["images.backups"] == 1 and (images / "a.txt.bak").read_text() == "Edited by hand."
    assert (images / "a.tags.txt").read_bytes() == original
    assert (images / ".tagcaption" / "lock").read_text() == ""  # released
