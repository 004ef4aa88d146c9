"""A corpus of awkward files: one clear line per bad one, correct captions for the rest."""
from __future__ import annotations

import base64
import io
import json
import os
import struct
import zlib

import pytest
from PIL import Image

from conftest import make_image, run_caption, write_config
from fake_servers import Text, user_text


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(path, side=40000):
    """A tiny file whose header claims 1.6 gigapixels."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
                     + png_chunk(b"IEND", b""))


def exif_rotated_jpeg(path):
    """60×30 pixels stored, EXIF orientation 6: a viewer shows it 30×60, rotated."""
    image = Image.new("RGB", (60, 30), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, exif=exif)


def seen(request) -> str:
    for message in request["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    header, data = part["image_url"]["url"].split(",", 1)
                    image = Image.open(io.BytesIO(base64.b64decode(data)))
                    return f"{header} {image.format} {image.mode} {image.size[0]}x{image.size[1]}"
    raise AssertionError("no image in the request")


@pytest.fixture
def corpus(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    bad = {}
    good = {}

    jpeg = io.BytesIO()
    Image.new("RGB", (200, 200), (10, 200, 10)).save(jpeg, "JPEG")
    (images / "truncated.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    bad["truncated.jpg"] = "truncated"
    (images / "empty.jpg").write_bytes(b"")
    bad["empty.jpg"] = "not a readable image (unknown format or damaged file)"
    (images / "notes.png").write_text("these are my notes, not a picture")
    bad["notes.png"] = "not a readable image"
    bomb_png(images / "bomb.png")
    bad["bomb.png"] = "decompression bomb"
    (images / "folder.png").mkdir()  # a folder with an image's name is a folder, not a bad image
    os.symlink(images / "gone.webp", images / "dangling.png")
    bad["dangling.png"] = "No such file"
    if os.geteuid() != 0:  # root reads any file whatever its mode
        make_image(images / "locked.png")
        os.chmod(images / "locked.png", 0)
        bad["locked.png"] = "Permission denied"

    make_image(images / "nul.png")
    (images / "nul.txt").write_bytes(b"red\x00square")
    bad["nul.png"] = "holds NUL bytes: not a text file"
    make_image(images / "huge.png")
    (images / "huge.txt").write_bytes(b"x, " * 400_000)
    bad["huge.png"] = "too large for a tags file"

    make_image(images / "tiny.png", size=(1, 1))
    good["tiny.png"] = "data:image/png;base64 PNG RGB 1x1"  # image_format auto: sent as it is
    make_image(images / "wide.png", size=(20000, 100))
    good["wide.png"] = "data:image/jpeg;base64 JPEG RGB 1536x8"
    make_image(images / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0))
    good["cmyk.jpg"] = "data:image/jpeg;base64 JPEG RGB 64x48"
    make_image(images / "deep.png", mode="I;16", color=40000)
    good["deep.png"] = "data:image/jpeg;base64 JPEG RGB 64x48"
    palette = Image.new("P", (32, 32), 1)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.save(images / "palette.png", transparency=1)
    good["palette.png"] = "data:image/jpeg;base64 JPEG RGB 32x32"
    frames = [Image.new("RGB", (40, 20), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(images / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good["animated.gif"] = "data:image/jpeg;base64 JPEG RGB 40x20"
    exif_rotated_jpeg(images / "rotated.jpg")
    good["rotated.jpg"] = "data:image/jpeg;base64 JPEG RGB 30x60"
    make_image(images / "café au lait ☕.png")
    good["café au lait ☕.png"] = "data:image/png;base64 PNG RGB 64x48"
    (images / "sub").mkdir()
    os.symlink(images, images / "sub" / "loop")
    make_image(images / "sub" / "inner.png")
    good["sub/inner.png"] = "data:image/png;base64 PNG RGB 64x48"

    tag_files = {
        "latin1.png": ("café, crème brûlée".encode("latin-1"), "café, crème brûlée"),
        "bom.png": ("\ufeffsmile, 1girl".encode("utf-8"), "smile, 1girl"),
        "notags.png": (b"", ""),
        "odd.png": ('{tags}, a}b{c, back\\slash, "quoted", ratio:16:9'.encode(), '{tags}, a}b{c, back\\slash, "quoted", ratio:16:9'),
        "big.png": ((", ".join(f"tag{n % 40}" for n in range(15000))).encode(), ", ".join(f"tag{n}" for n in range(40))),
        "utf16.png": ("red square, blue sky".encode("utf-16"), "red square, blue sky"),
    }
    for name, (data, shown) in tag_files.items():
        make_image(images / name)
        (images / name).with_suffix(".txt").write_bytes(data)
        good[name] = "data:image/png;base64 PNG RGB 64x48"
    assert len((images / "big.txt").read_bytes()) > 100_000
    return images, good, bad, {name: shown for name, (_, shown) in tag_files.items()}


def test_bad_input_corpus(tmp_path, corpus, llm_server, vision_server, danbooru, capsys):
    images, good, bad, shown_tags = corpus
    vision_server.responder = lambda request: Text(f"Seen {seen(request)}.")
    llm_server.responder = lambda request: Text("Caption of " + user_text(request).split("DESCRIPTION: ", 1)[1]
                                                .split("\n", 1)[0])
    template = tmp_path / "template.txt"
    template.write_text("TAGS: {tags}\nDESCRIPTION: {description}\n")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, recursive=True,
                          tag_provider={"skip": True}, output={"extension": ".caption"},
                          endpoints={"vision": {"base_url": vision_server.base_url, "max_retries": 0}},
                          interrogator={"skip": False, "endpoint": "vision"},
                          interpreter={"prompt_template": str(template)})

    code, out, err = run_caption([str(images), "--config", str(config)], capsys)

    assert code == 1
    assert "Traceback" not in out + err
    listed = out.split("Failures:", 1)[1].splitlines()  # live, repeats of one kind are grouped
    failed_lines = [f"failed: {line.strip()}" for line in listed if line.startswith(f"  {images}")]
    assert len(failed_lines) == len(bad), failed_lines
    for name, reason in bad.items():
        line = next(line for line in failed_lines if line.startswith(f"failed: {images / name}:"))
        assert reason in line, line
        assert not (images / name).with_suffix(".caption").exists()
    for name, description in good.items():
        assert (images / name).with_suffix(".caption").read_text() == f"Caption of Seen {description}.", name
    for name, tags in shown_tags.items():
        prompt = next(user_text(r) for r in llm_server.chat_requests
                      if f"TAGS: {tags}\n" in user_text(r))
        assert prompt
    assert f"{len(good)} captioned, 0 skipped (caption exists), {len(bad)} failed" in out
    assert list(images.rglob("*.tags.txt")) == [] and list(images.rglob("*.tmp")) == []


def test_tags_only_mode_still_rejects_broken_images(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    images.mkdir()
    jpeg = io.BytesIO()
    Image.new("RGB", (300, 300), (10, 200, 10)).save(jpeg, "JPEG")
    (images / "cut.jpg").write_bytes(jpeg.getvalue()[:400])
    (images / "cut.txt").write_text("cat")
    make_image(images / "fine.png")
    (images / "fine.txt").write_text("dog")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "1 captioned" in out and "cut.jpg: image:" in out
    assert (images / "cut.txt").read_text() == "cat"
    assert all("cat" not in user_text(r) for r in llm_server.chat_requests)


def test_old_prose_captions_are_not_read_as_tags(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_image(images / "a.png")
    prose = "A woman with long red hair stands in a wheat field at sunset, smiling at the camera."
    (images / "a.txt").write_text(prose)
    make_image(images / "b.png")
    (images / "b.txt").write_text("cat")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "1 captioned, 1 skipped" in out
    assert (images / "a.txt").read_text() == prose
    assert all("wheat" not in user_text(r) for r in llm_server.chat_requests)


def test_an_overlong_tag_is_not_looked_up_and_costs_no_other_image(tmp_path, llm_server, danbooru, capsys):
    danbooru.wiki = {"red_square": "A red square."}
    images = tmp_path / "images"
    make_image(images / "a.png")
    (images / "a.txt").write_text("red_square, " + "x" * 70000)
    make_image(images / "b.png")
    (images / "b.txt").write_text("red_square")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert "1 summarised" in out
    assert all(len(name) < 100 for name in danbooru.looked_up())
    assert (images / "b.txt").read_text() != "red_square"  # captioned
    assert code in (0, 1) and "Traceback" not in err
    assert all(len(line) < 1200 for line in err.splitlines())


def test_damaged_state_files_cost_a_line_at_most(tmp_path, llm_server, danbooru, capsys):
    """A hand-damaged cache entry, a lock file holding a list, a reply with a malformed `usage`
    and a failures.jsonl that cannot be written: the captions are made, the summary printed."""
    images = tmp_path / "images"
    make_image(images / "a.png")
    (images / "a.txt").write_text("red_square")
    make_image(images / "b.png")  # no tags and no vision model: fails
    danbooru.wiki = {"red_square": "A red square."}
    (tmp_path / "tags_cache.json").write_text('{"red_square": {"checked": "yesterday", "summary": null}}')
    (images / ".tagcaption").mkdir()
    (images / ".tagcaption" / "lock").write_text("[1]")
    (images / "failures.jsonl").mkdir()
    llm_server.responder = lambda request: Text("A red square.")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1, err
    assert "1 captioned" in out and "1 failed" in out and "1 summarised" in out
    assert f"cannot write {images / 'failures.jsonl'}" in err
    assert "unexpected" not in err and "Traceback" not in err
    assert (images / "a.txt").read_text() == "A red square."


def test_a_malformed_usage_field_does_not_cost_the_caption(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_image(images / "a.png")
    (images / "a.txt").write_text("cat")
    original = llm_server._completion

    def completion(request, reply):
        body = original(request, reply)
        body["usage"] = ["not", "a", "mapping"]
        return body
    llm_server._completion = completion
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          endpoints={"default": {"stream": False}})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "1 captioned" in out, err


def test_a_yaml_mistake_is_named_with_its_line(tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text("interpreter:\n  model: a\ninterpreter:\n  model: b\n")
    code, _, err = run_caption([str(tmp_path), "--config", str(config)], capsys)
    assert code == 2
    assert "found duplicate key interpreter (line 3, column 1)" in err, err


def test_a_damaged_failures_file_and_a_bottomless_sidecar_cost_a_line(tmp_path, llm_server, danbooru, capsys):
    """A failures.jsonl that is not UTF-8 in places still names what it can to --retry-failed;
    a JSON sidecar nested a hundred thousand deep fails its own image, in words."""
    images = tmp_path / "images"
    for name in ("a", "b", "c"):
        make_image(images / f"{name}.png")
    (images / "a.txt").write_text("red_square")
    (images / "b.txt").write_text("red_square")
    (images / "c.json").write_text("[" * 100_000 + "]" * 100_000)
    llm_server.responder = lambda request: Text("A red square.")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          tag_provider={"skip": True}, interrogator={"skip": True})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "2 captioned" in out
    assert "c.png: cannot read tags: a sidecar of this image is nested too deeply" in err
    (images / "a.txt").unlink()  # a is to be captioned again, from its kept tags
    (images / "failures.jsonl").write_bytes(b"\xff\xfe{torn\n" + f'{{"image": "{images / "a.png"}"}}\n'.encode())
    code, out, err = run_caption([str(images), "--config", str(config), "--retry-failed"], capsys)
    assert "unexpected" not in err and "1 captioned" in out, err
    assert (images / "a.txt").read_text() == "A red square."


def test_a_file_name_that_is_not_utf8_and_an_error_holding_a_lone_surrogate(tmp_path, llm_server, danbooru, capsys):
    """Linux file names are bytes: one that is not UTF-8 is captioned, recorded as ours and
    skipped on a rerun; a server error text with a lone surrogate still reaches failures.jsonl."""
    from fake_servers import Error

    images = tmp_path / "images"
    images.mkdir()
    odd = os.fsdecode(b"\xffodd")
    make_image(images / f"{odd}.png")
    (images / f"{odd}.txt").write_text("red_square")
    make_image(images / "b.png")
    (images / "b.txt").write_text("blue_square")
    llm_server.responder = lambda request: Error(400, {"error": {"message": "bad \ud800 thing"}}) \
        if "blue" in user_text(request) else Text("A red square.")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"formats": ["txt", "jsonl", "metadata"], "report": True})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "1 captioned" in out and "unexpected" not in out + err, out + err
    assert (images / f"{odd}.txt").read_text() == "A red square."
    (failure,) = [json.loads(line) for line in (images / "failures.jsonl").read_text().splitlines()]
    assert failure["image"].endswith("b.png") and "bad" in failure["message"]
    code, out, err = run_caption([str(images), "--config", str(config), "--retry-failed"], capsys)
    assert "unexpected" not in out + err and (images / f"{odd}.txt").read_text() == "A red square."
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert "1 skipped" in out and not (images / f"{odd}.tags.txt").read_text().startswith("A red")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["caption", "structured"])
def test_a_fifo_where_a_caption_goes_fails_its_image_and_the_run_ends(tmp_path, llm_server, danbooru, capsys, where):
    """The writer reads a file it may replace (is it ours? its backup): a FIFO there is refused by
    stat, not opened, which would wait for a writer for ever."""
    images = tmp_path / "images"
    make_image(images / "a.png")
    (images / "a.txt").write_text("red_square")
    os.mkfifo(images / ("a.caption" if where == "caption" else "a.caption.json"))
    llm_server.responder = lambda request: Text(json.dumps({"subject": "a red square"}))
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object", "required": ["subject"],
                                                      "properties": {"subject": {"type": "string"}}}))
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption", "overwrite": True},
                          interpreter={"response_schema": str(tmp_path / "schema.json")})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "not a regular file (a FIFO, device or socket)" in err and "unexpected" not in err
    assert (images / ("a.caption" if where == "caption" else "a.caption.json")).is_fifo()
