"""The Interrogator (issue 5): what the vision model is sent, hint sources, conversations,
models that cannot see, context overflow, and the debug transcripts."""
from __future__ import annotations

import base64
import io
import json
import os
import re

from PIL import Image, PngImagePlugin

from conftest import make_image, run_caption, write_config
from fake_servers import Error, Text, user_text
from tagcaption.hints import HintInput, collect_hints


def sent_image(request):
    for message in request["messages"]:
        if isinstance(message["content"], list):
            for part in message["content"]:
                if part["type"] == "image_url":
                    header, data = part["image_url"]["url"].split(",", 1)
                    raw = base64.b64decode(data)
                    return header, raw, Image.open(io.BytesIO(raw))
    raise AssertionError("no image sent")


def describing(request):
    header, _, image = sent_image(request)
    return Text(f"{header.split(';')[0][5:]} {image.format} {image.size[0]}x{image.size[1]}")


def vision_config(tmp_path, vision_server, danbooru, **interrogator):
    return write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url, recursive=True,
                        tag_provider={"skip": True}, interpreter={"skip": True},
                        output={"extension": ".caption"},
                        interrogator={"skip": False, "model": "vision-model", **interrogator})


def test_every_format_arrives_as_a_decodable_jpeg_of_the_right_size(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = describing
    images = tmp_path / "images"
    formats = {"a.jpg": "JPEG", "b.png": "PNG", "c.webp": "WEBP", "d.gif": "GIF", "e.bmp": "BMP",
               "f.tiff": "TIFF", "g.avif": "AVIF"}
    for name, fmt in formats.items():
        make_image(images / name, size=(800, 400), format=fmt)
    make_image(images / "small.png", size=(100, 50))
    config = vision_config(tmp_path, vision_server, danbooru, max_image_size=256, image_format="jpeg")
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    for name in formats:
        # A JPEG may be decoded at a reduced scale (draft mode) that lands within a quarter below the limit.
        expected = "image/jpeg JPEG 200x100" if name == "a.jpg" else "image/jpeg JPEG 256x128"
        assert (images / name).with_suffix(".caption").read_text() == expected, name
    assert (images / "small.caption").read_text() == "image/jpeg JPEG 100x50"  # never upscaled


def test_png_original_and_unlimited_size(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = describing
    images = tmp_path / "images"
    make_image(images / "photo.jpg", size=(300, 200))
    config = vision_config(tmp_path, vision_server, danbooru, image_format="png", max_image_size=0)
    run_caption([str(images), "--config", str(config)], capsys)
    assert (images / "photo.caption").read_text() == "image/png PNG 300x200"

    other = tmp_path / "other"
    make_image(other / "as_is.webp", size=(120, 80), format="WEBP")
    make_image(other / "big.png", size=(3000, 100))
    make_image(other / "big_photo.jpg", size=(2400, 1800))  # decodable at half scale: must still be shrunk
    config = vision_config(tmp_path, vision_server, danbooru, image_format="original", max_image_size=1536)
    run_caption([str(other), "--config", str(config)], capsys)
    assert (other / "as_is.caption").read_text() == "image/webp WEBP 120x80"
    sent = next(sent_image(r)[1] for r in vision_server.chat_requests if sent_image(r)[2].size == (120, 80))
    assert sent == (other / "as_is.webp").read_bytes()
    assert (other / "big.caption").read_text() == "image/jpeg JPEG 1536x51"  # too big: re-encoded
    assert (other / "big_photo.caption").read_text() == "image/jpeg JPEG 1200x900"


def test_orientation_transparency_and_first_frame(tmp_path, vision_server, danbooru, capsys):
    pixels = {}

    def respond(request):
        _, _, image = sent_image(request)
        rgb = image.convert("RGB")
        pixels[image.size] = [rgb.getpixel((x, y)) for x, y in ((5, 5), (image.size[0] - 5, image.size[1] - 5))]
        return Text("seen")
    vision_server.responder = respond
    images = tmp_path / "images"
    images.mkdir()
    rotated = Image.new("RGB", (60, 30), (255, 0, 0))
    rotated.paste((0, 0, 255), (0, 0, 30, 30))  # blue on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: the blue square ends up on top
    rotated.save(images / "rotated.jpg", exif=exif, quality=95)
    Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(images / "clear.png")
    frames = [Image.new("RGB", (50, 20), color) for color in ((0, 255, 0), (0, 0, 255))]
    frames[0].save(images / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    config = vision_config(tmp_path, vision_server, danbooru, background="#ffff00")
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    top, bottom = pixels[(30, 60)]
    assert top[2] > 200 and top[0] < 60 and bottom[0] > 200 and bottom[2] < 60
    assert all(channel > 200 for channel in pixels[(40, 40)][0][:2]) and pixels[(40, 40)][0][2] < 60
    assert pixels[(50, 20)][0][1] > 200 and pixels[(50, 20)][0][2] < 60


def test_text_only_model_stops_the_run_with_exit_2(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = lambda request: Error(400, {
        "object": "error", "message": "Qwen2.5-7B-Instruct is not a multimodal model", "type": "BadRequestError",
        "param": None, "code": 400})
    images = tmp_path / "images"
    for n in range(20):
        make_image(images / f"{n:02}.png")
    config = vision_config(tmp_path, vision_server, danbooru, endpoint="default")
    code, out, err = run_caption([str(images), "--config", str(config), "endpoints.default.concurrency=2"], capsys)
    assert code == 2
    assert err.count("cannot see images") == 1 and "'vision-model'" in err and vision_server.base_url in err
    assert len(vision_server.chat_requests) <= 4
    assert "not started" in out and not list(images.glob("*.caption"))


def test_llama_cpp_without_mmproj_is_not_retried(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = lambda request: Error(500, {"error": {
        "code": 500, "type": "server_error",
        "message": "image input is not supported - hint: if this is unexpected, you may need to provide the mmproj"}})
    images = tmp_path / "images"
    make_image(images / "a.png")
    config = vision_config(tmp_path, vision_server, danbooru)
    code, _, err = run_caption([str(images), "--config", str(config), "endpoints.default.max_retries=3"], capsys)
    assert code == 2 and "--mmproj" in err
    assert len(vision_server.chat_requests) == 1


def test_context_overflow_sends_the_image_again_at_half_size(tmp_path, vision_server, danbooru, capsys):
    def respond(request):
        _, _, image = sent_image(request)
        if max(image.size) > 600:
            return Error(400, {"error": {"code": 400, "type": "exceed_context_size_error",
                                         "message": "request (5210 tokens) exceeds the available context size "
                                                    "(4096 tokens), try increasing it"}})
        return describing(request)
    vision_server.responder = respond
    images = tmp_path / "images"
    make_image(images / "big.png", size=(1000, 800))
    config = vision_config(tmp_path, vision_server, danbooru, max_image_size=1000)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert (images / "big.caption").read_text() == "image/jpeg JPEG 500x400"
    assert "1 images sent again at half size" in out and "at 500 px" in err
    assert [sent_image(r)[2].size for r in vision_server.chat_requests] == [(1000, 800), (500, 400)]


def test_reasoning_is_not_part_of_the_description(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = lambda request: Text("<think>Let me look closely.</think>A red square.",
                                                   reasoning_content="The user wants a description...")
    images = tmp_path / "images"
    make_image(images / "a.png")
    config = vision_config(tmp_path, vision_server, danbooru)
    run_caption([str(images), "--config", str(config)], capsys)
    assert (images / "a.caption").read_text() == "A red square."


def test_debug_dir_writes_each_conversation_without_images_or_keys(tmp_path, vision_server, danbooru, capsys):
    secret = "sk-debug-SECRET-998877"
    vision_server.responder = lambda request: Text(f"Answer to: {user_text(request)[-20:]}")
    images = tmp_path / "images"
    make_image(images / "one.png")
    make_image(images / "sub" / "one.png")
    config = write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url, recursive=True,
                          endpoints={"default": {"api_key": secret}},
                          tag_provider={"skip": True}, output={"extension": ".caption"},
                          interrogator={"skip": False, "prompts": ["First question?", "Second question?"]},
                          interpreter={"model": "vision-model"})
    debug = tmp_path / "debug"
    code, out, _ = run_caption([str(images), "--config", str(config), "--debug-dir", str(debug)], capsys)
    assert code == 0, out
    make_image(images / "sub__one.png")  # must not share a transcript file with sub/one.png
    code, out, _ = run_caption([str(images), "--config", str(config), "--debug-dir", str(debug)], capsys)
    assert sorted(p.name for p in debug.iterdir()) == ["one.png.json", "sub%2Fone.png.json", "sub__one.png.json"]
    record = json.loads((debug / "sub%2Fone.png.json").read_text())
    turns = record["interrogator"]
    assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant"]
    assert turns[0]["content"][1]["image_url"] == "[image: image/png 64x48, 0 KB]"
    assert record["interpreter"][-1]["role"] == "assistant"
    assert record["interpreter"][-1]["content"] == (images / "sub" / "one.caption").read_text()
    for path in debug.iterdir():
        assert secret not in path.read_text() and "base64" not in path.read_text()


# --- hint sources ------------------------------------------------------------------------


def hints_for(path, names, root, tags=()):
    return collect_hints(names, HintInput(path, path.relative_to(root), list(tags)))


def test_full_path_folder_metadata_and_tags(tmp_path):
    image = make_image(tmp_path / "cloud strife" / "001.png")
    (tmp_path / "cloud strife" / "metadata.json").write_text(json.dumps(
        {"character": "Cloud Strife", "outfits": ["SOLDIER uniform", "casual"]}))
    text = hints_for(image, ["full_path", "folder_metadata", "tags"], tmp_path, ["long_hair", "sword"])
    assert text == ("File path: cloud strife/001.png\nFolder metadata:\ncharacter: Cloud Strife\n"
                    "outfits: SOLDIER uniform, casual\nTags: long hair, sword")


def test_sidecar_json_gallery_dl_and_generic(tmp_path):
    image = make_image(tmp_path / "danbooru_4567_0123abcd.jpg")
    (tmp_path / "danbooru_4567_0123abcd.jpg.json").write_text(json.dumps({
        "id": 4567, "md5": "0123abcd", "rating": "q", "score": 42, "source": "https://www.pixiv.net/artworks/1",
        "tag_string": "1girl hatsune_miku vocaloid kei_(artist) highres",
        "tag_string_general": "1girl", "tag_string_character": "hatsune_miku",
        "tag_string_copyright": "vocaloid", "tag_string_artist": "kei_(artist)", "tag_string_meta": "highres",
        "tags_character": ["hatsune_miku"], "image_width": 1200, "image_height": 1600,
        "date": "2024-01-01 00:00:00", "filename": "0123abcd", "extension": "jpg", "category": "danbooru",
        "search_tags": "hatsune_miku"}, indent=4))
    assert hints_for(image, ["sidecar_json"], tmp_path) == (
        "Characters: hatsune miku\nCopyright: vocaloid\nArtist: kei (artist)\nRating: questionable")
    other = make_image(tmp_path / "shot.png")
    (tmp_path / "shot.json").write_text(json.dumps({"title": "Sunset pier", "alt": "", "url": "x" * 500}))
    text = hints_for(other, ["sidecar_json"], tmp_path)
    assert text.startswith("Metadata:\ntitle: Sunset pier\nurl: xxx") and len(text) < 260


def test_generation_parameters_from_a1111_comfyui_and_exif(tmp_path):
    a1111 = tmp_path / "a1111.png"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "masterpiece, 1girl, silver hair, night city\nNegative prompt: lowres, bad hands\n"
                                "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 12345, Size: 832x1216")
    Image.new("RGB", (16, 16)).save(a1111, pnginfo=info)
    assert hints_for(a1111, ["generation_parameters"], tmp_path) == \
        "Generation prompt: masterpiece, 1girl, silver hair, night city"

    comfy = tmp_path / "comfy.png"
    graph = {"3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0], "negative": ["7", 0], "seed": 1}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a castle on a hill, sunset", "clip": ["4", 1]}},
             "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["4", 1]}}}
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    Image.new("RGB", (16, 16)).save(comfy, pnginfo=info)
    assert hints_for(comfy, ["generation_parameters"], tmp_path) == "Generation prompt: a castle on a hill, sunset"

    jpeg = tmp_path / "a1111.jpg"
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "red fox in snow\nSteps: 20".encode("utf-16-be")
    Image.new("RGB", (16, 16)).save(jpeg, exif=exif)
    assert hints_for(jpeg, ["generation_parameters"], tmp_path) == "Generation prompt: red fox in snow"
    assert hints_for(make_image(tmp_path / "plain.png"), ["generation_parameters"], tmp_path) == ""


def test_exif_camera_lens_and_date(tmp_path):
    photo = tmp_path / "photo.jpg"
    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0110] = "Canon EOS R5"
    exif.get_ifd(0x8769)[0x9003] = "2023:05:01 18:30:00"
    exif.get_ifd(0x8769)[0xA434] = "RF50mm F1.2 L USM"
    Image.new("RGB", (16, 16)).save(photo, exif=exif)
    assert hints_for(photo, ["exif"], tmp_path) == \
        "Photo: camera Canon EOS R5, lens RF50mm F1.2 L USM, taken 2023:05:01 18:30:00"


def test_a_prompt_naming_hints_gets_them_once(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = lambda request: Text(user_text(request).replace("\n", " | "))
    images = tmp_path / "images"
    make_image(images / "a.png")
    config = vision_config(tmp_path, vision_server, danbooru, prompts=["Context: {hints}. Describe it."],
                           hint_sources=["full_path"])
    run_caption([str(images), "--config", str(config)], capsys)
    assert (images / "a.caption").read_text() == "Context: File path: a.png. Describe it."


def test_a_failing_hint_source_costs_a_warning_not_the_image(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = lambda request: Text("Prompt was: " + user_text(request).replace("\n", " | "))
    images = tmp_path / "images"
    make_image(images / "a.png")
    (images / "metadata.json").write_text("{broken json")
    config = vision_config(tmp_path, vision_server, danbooru, prompts=["Describe."],
                           hint_sources=["folder_metadata", "full_path"])
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "hint source 'folder_metadata' failed" in err
    assert (images / "a.caption").read_text() == "Prompt was: Describe. | | File path: a.png"


def test_a_stop_counts_every_image_once_even_those_the_walk_had_not_reached(tmp_path, vision_server, danbooru,
                                                                           capsys):
    """The folder is walked as captioning goes: after an early stop, the images not looked at
    yet are "not reached", apart from those found needing a caption ("not started")."""
    vision_server.responder = lambda request: Error(400, {"error": {"message": "image input is not supported"}})
    images = tmp_path / "images"
    first = make_image(images / "0000.png")
    for n in range(1, 1500):
        os.link(first, images / f"{n:04}.png")
    for n in range(1200, 1500):
        (images / f"{n:04}.caption").write_text("Written by hand.", encoding="utf-8")
    config = vision_config(tmp_path, vision_server, danbooru, endpoint="default")
    code, out, _ = run_caption([str(images), "--config", str(config), "endpoints.default.concurrency=2"], capsys)
    assert code == 2
    counts = dict((label, int(number)) for number, label in re.findall(
        r"(\d+) (captioned|skipped|failed|not started|not reached)", out))
    assert counts["captioned"] == 0 and counts["failed"] == 0
    assert sum(counts.values()) == 1500, out
    assert counts["not reached"] > 0 and counts.get("skipped", 0) + counts["not reached"] >= 300, out
    assert all((images / f"{n:04}.caption").read_text() == "Written by hand." for n in range(1200, 1500))
