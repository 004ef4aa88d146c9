"""`image_format: auto` (issue 16): an upright JPEG or PNG that every server reads goes as the
file's own bytes; everything else is re-encoded as before. End to end through caption.py,
each image's bytes as the vision server received them."""
from __future__ import annotations

import base64
import io
import os

from PIL import Image

from conftest import make_image, run_caption, write_config
from fake_servers import Text


def image_parts(request):
    for message in request["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    header, data = part["image_url"]["url"].split(",", 1)
                    return header[len("data:"):].split(";")[0], base64.b64decode(data)
    raise AssertionError("no image sent")


def noise(size, mode="RGB") -> Image.Image:
    return Image.frombytes(mode, size, os.urandom(size[0] * size[1] * len(mode)))


def run_vision(tmp_path, vision_server, danbooru, capsys, **interrogator):
    """Caption tmp_path/images with the vision model alone; {file name: (mime, bytes sent)}."""
    sent = {}

    def respond(request):
        mime, data = image_parts(request)
        name = request["messages"][-1]["content"][0]["text"].rsplit(" ", 1)[1]
        sent[name] = (mime, data)
        return Text("Seen.")
    vision_server.responder = respond
    config = write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url, tag_provider={"skip": True},
                          interpreter={"skip": True}, output={"extension": ".caption"},
                          interrogator={"skip": False, "model": "vision-model", "prompts": ["Describe {filename}"],
                                        **interrogator})
    code, out, err = run_caption([str(tmp_path / "images"), "--config", str(config)], capsys)
    assert code == 0, out + err
    return sent


def test_jpeg_and_png_that_servers_read_go_as_they_are(tmp_path, vision_server, danbooru, capsys):
    images = tmp_path / "images"
    images.mkdir()
    noise((300, 200)).save(images / "photo.jpg", quality=85, progressive=True)
    noise((200, 100)).save(images / "screen.png")
    noise((120, 80), "L").save(images / "grey.jpg")
    sent = run_vision(tmp_path, vision_server, danbooru, capsys, max_image_size=512)
    assert sent["photo.jpg"] == ("image/jpeg", (images / "photo.jpg").read_bytes())
    assert sent["screen.png"] == ("image/png", (images / "screen.png").read_bytes())
    assert sent["grey.jpg"] == ("image/jpeg", (images / "grey.jpg").read_bytes())


def test_everything_else_is_re_encoded_as_jpeg(tmp_path, vision_server, danbooru, capsys):
    images = tmp_path / "images"
    images.mkdir()
    noise((1000, 500)).save(images / "big.jpg")                      # over max_image_size
    exif = Image.Exif()
    exif[0x0112] = 6
    noise((60, 30)).save(images / "rotated.jpg", exif=exif)          # needs turning upright
    make_image(images / "alpha.png", mode="RGBA", color=(255, 0, 0, 10))
    make_image(images / "keyed.png", mode="RGB", transparency=(200, 30, 30))
    Image.new("P", (40, 40), 3).save(images / "palette.png")
    make_image(images / "deep.png", mode="I;16", color=40000)
    make_image(images / "cmyk.jpg", mode="CMYK", color=(0, 255, 255, 0))
    make_image(images / "photo.webp", format="WEBP")                # LM Studio cannot read WebP
    frames = [Image.new("RGB", (40, 20), color) for color in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(images / "moving.png", save_all=True, append_images=frames[1:], duration=100)
    whole = io.BytesIO()
    noise((64, 48)).save(whole, "JPEG")
    (images / "trailer.jpg").write_bytes(whole.getvalue() + b"camera maker's trailer")
    sent = run_vision(tmp_path, vision_server, danbooru, capsys, max_image_size=512)
    assert len(sent) == 10
    for name, (mime, data) in sent.items():
        shown = Image.open(io.BytesIO(data))
        assert mime == "image/jpeg" and shown.format == "JPEG" and shown.mode == "RGB", name
        assert data != (images / name).read_bytes(), name
    assert Image.open(io.BytesIO(sent["big.jpg"][1])).size == (500, 250)  # decoded at half scale (draft)
    assert Image.open(io.BytesIO(sent["rotated.jpg"][1])).size == (30, 60)


def test_a_file_over_4_mb_is_re_encoded_even_when_it_could_go_as_it_is(tmp_path, vision_server, danbooru, capsys):
    images = tmp_path / "images"
    images.mkdir()
    noise((1300, 1100)).save(images / "heavy.png", compress_level=0)
    assert (images / "heavy.png").stat().st_size > 4 * 1024 * 1024
    sent = run_vision(tmp_path, vision_server, danbooru, capsys, max_image_size=2048)
    mime, data = sent["heavy.png"]
    assert mime == "image/jpeg" and Image.open(io.BytesIO(data)).size == (1300, 1100)


def test_jpeg_png_and_original_still_do_what_they_say(tmp_path, vision_server, danbooru, capsys):
    images = tmp_path / "images"
    images.mkdir()
    noise((64, 48)).save(images / "a.png")
    assert run_vision(tmp_path, vision_server, danbooru, capsys, image_format="jpeg")["a.png"][0] == "image/jpeg"
    (images / "a.caption").unlink()
    noise((64, 48)).save(images / "b.jpg")
    sent = run_vision(tmp_path, vision_server, danbooru, capsys, image_format="png")
    assert sent["b.jpg"][0] == "image/png"
    for caption in images.glob("*.caption"):
        caption.unlink()
    make_image(images / "c.webp", format="WEBP")
    sent = run_vision(tmp_path, vision_server, danbooru, capsys, image_format="original")
    assert sent["c.webp"] == ("image/webp", (images / "c.webp").read_bytes())
