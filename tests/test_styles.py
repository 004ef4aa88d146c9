"""Caption styles, post-processing, quality guards, sampling and variants (issue 6)."""
from __future__ import annotations

import base64
import io
import json
import threading

import pytest
from PIL import Image

from tagcaption.config import PostprocessConfig, load_config
from tagcaption.errors import ConfigError
from conftest import make_dataset, make_image, run_caption, write_config
from fake_servers import Text, user_text
from tagcaption.guards import other_script_share, repetition
from tagcaption.postprocess import add_affixes, clean_caption
from tagcaption.variants import build_variants

# The seed's own words (shared/seeds/001: JoyCaption's prompt catalogue), per type and length form.
SEED = {
    "descriptive": ("Write a descriptive caption for this image in a formal tone.",
                    "Write a descriptive caption for this image in a formal tone within 40 words.",
                    "Write a long descriptive caption for this image in a formal tone."),
    "descriptive_casual": ("Write a descriptive caption for this image in a casual tone.",
                           "Write a descriptive caption for this image in a casual tone within 40 words.",
                           "Write a long descriptive caption for this image in a casual tone."),
    "stable_diffusion": ("Write a stable diffusion prompt for this image.",
                         "Write a stable diffusion prompt for this image within 40 words.",
                         "Write a long stable diffusion prompt for this image."),
    "midjourney": ("Write a MidJourney prompt for this image.",
                   "Write a MidJourney prompt for this image within 40 words.",
                   "Write a long MidJourney prompt for this image."),
    "booru_tags": ("Write a list of Booru tags for this image.",
                   "Write a list of Booru tags for this image within 40 words.",
                   "Write a long list of Booru tags for this image."),
    "booru_like_tags": ("Write a list of Booru-like tags for this image.",
                        "Write a list of Booru-like tags for this image within 40 words.",
                        "Write a long list of Booru-like tags for this image."),
    "art_critic": (
        "Analyze this image like an art critic would with information about its composition, style, symbolism, "
        "the use of color, light, any artistic movement it might belong to, etc.",
        "Analyze this image like an art critic would with information about its composition, style, symbolism, "
        "the use of color, light, any artistic movement it might belong to, etc. Keep it within 40 words.",
        "Analyze this image like an art critic would with information about its composition, style, symbolism, "
        "the use of color, light, any artistic movement it might belong to, etc. Keep it long."),
    "product_listing": ("Write a caption for this image as though it were a product listing.",
                        "Write a caption for this image as though it were a product listing. Keep it under 40 words.",
                        "Write a long caption for this image as though it were a product listing."),
    "social_media": ("Write a caption for this image as if it were being used for a social media post.",
                     "Write a caption for this image as if it were being used for a social media post. "
                     "Limit the caption to 40 words.",
                     "Write a long caption for this image as if it were being used for a social media post."),
}
OPTIONS = {
    "name": "If there is a person/character in the image you must refer to them as Aria.",
    "no_unchangeable": "Do NOT include information about people/characters that cannot be changed (like ethnicity, "
                       "gender, etc), but do still include changeable attributes (like hair style).",
    "lighting": "Include information about lighting.",
    "camera_angle": "Include information about camera angle.",
    "watermark": "Include information about whether there is a watermark or not.",
    "jpeg_artifacts": "Include information about whether there are JPEG artifacts or not.",
    "camera_details": "If it is a photo you MUST include information about what camera was likely used and details "
                      "such as aperture, shutter speed, ISO, etc.",
    "pg": "Do NOT include anything sexual; keep it PG.",
    "no_resolution": "Do NOT mention the image's resolution.",
    "aesthetic_quality": "You MUST include information about the subjective aesthetic quality of the image from low "
                         "to very high.",
    "composition": "Include information on the image's composition style, such as leading lines, rule of thirds, "
                   "or symmetry.",
    "no_text": "Do NOT mention any text that is in the image.",
    "depth_of_field": "Specify the depth of field and whether the background is in focus or blurred.",
    "lighting_sources": "If applicable, mention the likely use of artificial or natural lighting sources.",
    "no_ambiguity": "Do NOT use any ambiguous language.",
    "rating": "Include whether the image is sfw, suggestive, or nsfw.",
    "important_only": "ONLY describe the most important elements of the image.",
}
CASES = [(style, form, text) for style, texts in SEED.items() for form, text in zip(("any", "words", "long"), texts)]


def instruction_for(tmp_path, **style):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("{}")
    overrides = [f"interrogator.style={style.pop('preset')}", "interrogator.skip=false"]
    overrides += [f"style.{key}={json.dumps(value)}" for key, value in style.items()]
    config = load_config(str(config_file), overrides)
    (plan,) = build_variants(config, "interrogator")
    return plan.instruction


@pytest.mark.parametrize("style, form, expected", CASES, ids=[f"{s}-{f}" for s, f, _ in CASES])
def test_each_style_renders_the_seeds_instruction(tmp_path, style, form, expected):
    settings = {"any": {}, "words": {"word_count": 40}, "long": {"length": "long"}}[form]
    assert instruction_for(tmp_path, preset=style, **settings) == expected


def test_length_as_a_number_of_words_and_every_extra_option(tmp_path):
    assert instruction_for(tmp_path, preset="descriptive", length="25") == \
        "Write a descriptive caption for this image in a formal tone within 25 words."
    text = instruction_for(tmp_path, preset="descriptive", length="very short", name="Aria",
                           extra_options=list(OPTIONS))
    assert text == " ".join(["Write a very short descriptive caption for this image in a formal tone."]
                            + list(OPTIONS.values()))


@pytest.mark.parametrize("style, error", [
    ({"preset": "nonexistent"}, "unknown style 'nonexistent'; available: art_critic"),
    ({"preset": "descriptive", "length": "huge"}, "style.length must be one of"),
    ({"preset": "descriptive", "extra_options": ["glitter"]}, "unknown option(s) glitter"),
    ({"preset": "descriptive", "extra_options": ["name"]}, "needs style.name"),
])
def test_style_mistakes_are_config_errors(tmp_path, style, error):
    with pytest.raises(ConfigError) as raised:
        instruction_for(tmp_path, **style)
    assert error in str(raised.value)


def test_style_in_the_interpreter_rewrites_tags_and_description(tmp_path, llm_server, vision_server, danbooru,
                                                                capsys):
    vision_server.responder = lambda request: Text("A woman on a beach at dusk.")
    llm_server.responder = lambda request: Text("Golden hour vibes at the beach! #sunset")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "1girl, beach"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          endpoints={"vision": {"base_url": vision_server.base_url}},
                          interrogator={"skip": False, "endpoint": "vision", "style": "descriptive"},
                          style={"length": "short"})
    code, out, _ = run_caption([str(images), "--config", str(config), "--style", "social_rewrite"], capsys)
    assert code == 0, out
    vision_prompt = vision_server.chat_requests[0]["messages"][0]["content"][0]["text"]
    assert vision_prompt == "Write a short descriptive caption for this image in a formal tone."
    prompt = user_text(llm_server.chat_requests[0])
    assert "A woman on a beach at dusk." in prompt and "1girl, beach" in prompt
    assert ("Your task, about the image described below: Rewrite the description of this image into a short, "
            "engaging, attention-grabbing caption for a social media post.") in prompt
    assert (images / "a.txt").read_text() == "Golden hour vibes at the beach! #sunset"


def test_captioning_vlm_alone_and_tags_plus_description(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = lambda request: Text("a peaceful waterfall in the woods.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "waterfall, no_humans, highres, scenery"})
    config = write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption"}, interpreter={"skip": True},
                          interrogator={"skip": False, "model": "vision-model", "style": "tags_and_description"},
                          tags={"exclude_categories": [], "exclude": ["highres"]})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert (images / "a.caption").read_text() == "waterfall, no_humans, scenery, a peaceful waterfall in the woods."
    assert len(vision_server.chat_requests) == 1


@pytest.mark.parametrize("raw, clean", [
    ("Sure! Here is a caption for the image: A cat on a mat.", "A cat on a mat."),
    ("Here's a short caption:\n\nA cat on a mat.", "A cat on a mat."),
    ("Certainly! A cat on a mat.", "A cat on a mat."),
    ("Caption: A cat on a mat.", "A cat on a mat."),
    ("**Caption:** A **cat** on a *mat*.", "A cat on a mat."),
    ('"A cat on a mat."', "A cat on a mat."),
    ("“A cat on a mat.”", "A cat on a mat."),
    ("# Title\n- A cat\n- on a mat", "Title A cat on a mat"),
    ("A  cat\n\n on   a mat.", "A cat on a mat."),
    ('He said "hi" to a cat.', 'He said "hi" to a cat.'),
    ("Here is the cat's toy on the mat.", "Here is the cat's toy on the mat."),
    ("This is a post-apocalyptic city at dusk: ruined towers.", "This is a post-apocalyptic city at dusk: ruined towers."),
    ("Here's the poster design: a cat.", "Here's the poster design: a cat."),
])
def test_post_processing(raw, clean):
    assert clean_caption(raw, PostprocessConfig()) == clean


def test_optional_post_processing_steps():
    settings = PostprocessConfig(strip_image_shows=True, max_words=9)
    text = "The image shows a cat on a mat. It is asleep in the sun. The mat is red."
    assert clean_caption(text, settings) == "A cat on a mat."
    assert clean_caption("one two three four five six seven eight nine ten", settings) == \
        "one two three four five six seven eight nine"
    assert add_affixes(add_affixes("a cat", "ohwx, ", ""), "ohwx, ", "") == "ohwx, a cat"


def test_repetition_and_script_detectors():
    assert repetition("a cat " + "on a mat " * 6, 6) == "on a mat"
    assert repetition("wow" + "!" * 30, 6) == "!!!"
    assert repetition("A cat sits on a red mat near a window.", 6) is None
    assert other_script_share("A cat on a mat", "latin") == 0
    assert other_script_share("一只猫坐在垫子上 cat", "latin") > 0.5
    assert other_script_share("Café crème, naïve", "latin") == 0


def misbehave_once(bad, good="A cat on a mat."):
    seen = set()
    lock = threading.Lock()

    def respond(request):
        key = json.dumps(request["messages"][:1])
        with lock:
            first = key not in seen
            seen.add(key)
        return bad if first else Text(good)
    return respond


GUARD_CASES = [
    ("truncated", Text("A cat on a", finish_reason="length"), "truncated"),
    ("empty", Text("<think>hmm</think>"), "empty"),
    ("refusal", Text("I'm sorry, but I can't help with that."), "refusal"),
    ("please provide", Text("Please provide the image so I can describe it."), "refusal"),
    ("repetition", Text("A cat " + "on the mat " * 10), "repetition"),
    ("banned", Text("A stunning cat on a mat."), "banned phrase"),
    ("wrong script", Text("一只猫坐在垫子上。"), "wrong script"),
]


@pytest.mark.parametrize("name, bad, shown", GUARD_CASES, ids=[case[0] for case in GUARD_CASES])
def test_each_guard_retries_and_then_saves_a_good_caption(tmp_path, llm_server, danbooru, capsys, name, bad, shown):
    llm_server.responder = misbehave_once(bad)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          guards={"banned_phrases": ["stunning"]}, interpreter={"max_tokens": 50})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    assert (images / "a.txt").read_text() == "A cat on a mat."
    assert f"replies asked again: {shown} 1" in out
    first, second = llm_server.chat_requests
    if name == "truncated":
        assert (first["max_tokens"], second["max_tokens"]) == (50, 100)
    elif name in ("refusal", "please provide", "banned", "wrong script"):
        assert second["messages"][-2] == {"role": "assistant", "content": bad.content}
        assert second["messages"][-1]["role"] == "user"
    else:
        assert second["messages"] == first["messages"]


@pytest.mark.parametrize("reply, saved", [
    ('A girl holding a sign that says "I can\'t stop".', True),
    ("A poster reading I'm sorry in red letters.", True),
    ("Unfortunately, I am not able to view images.", False),
    ("As a language model, I don't have the ability to see images.", False),
    ("<think>unfinished reasoning about the picture", False),
])
def test_refusals_are_recognised_at_the_start_only(tmp_path, llm_server, danbooru, capsys, reply, saved):
    llm_server.responder = lambda request: Text(reply)
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption"}, guards={"max_attempts": 1})
    code, _, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert (code, (images / "a.caption").exists()) == ((0, True) if saved else (1, False))


def test_a_refused_tag_summary_costs_the_summary_not_the_images(tmp_path, llm_server, danbooru, capsys):
    danbooru.wiki = {"nsfw_tag": "Explicit.", "asuka": "Souryuu Asuka Langley."}

    def respond(request):
        text = user_text(request)
        if 'Tag: "nsfw tag"' in text:
            return Text("I'm sorry, but I can't describe that.")
        if 'Tag: "asuka"' in text:
            return Text("Souryuu Asuka Langley (惣流・アスカ・ラングレー), a pilot.")
        return Text("A caption.")
    llm_server.responder = respond
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": "nsfw_tag, asuka" for n in range(5)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url)
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "5 captioned" in out and "1 without summary" in out
    assert "tag 'nsfw_tag' has no summary" in err
    asked = len(llm_server.chat_requests)
    run_caption([str(images), "--config", str(config), "output.overwrite=true"], capsys)
    assert len(llm_server.chat_requests) - asked == 5  # the refusal is remembered: captions only


def test_a_guard_that_keeps_failing_fails_the_image_and_writes_nothing(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Text("As an AI, I cannot describe images.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption"}, guards={"max_attempts": 4})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and "refusal ('as an ai')" in out and "after 4 attempts" in out
    assert len(llm_server.chat_requests) == 4
    assert not (images / "a.caption").exists()
    record = json.loads((images / "failures.jsonl").read_text())
    assert record["kind"] == "guard_refusal" and record["attempts"] == 4


def test_prefix_is_not_doubled_on_a_rerun(tmp_path, llm_server, danbooru, capsys):
    replies = iter(["A cat on a mat.", "ohwx, a cat on a mat."])
    llm_server.responder = lambda request: Text(next(replies))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption"}, postprocess={"prefix": "ohwx, "})
    run_caption([str(images), "--config", str(config)], capsys)
    assert (images / "a.caption").read_text() == "ohwx, A cat on a mat."
    run_caption([str(images), "--config", str(config), "output.overwrite=true"], capsys)
    assert (images / "a.caption").read_text() == "ohwx, a cat on a mat."


def test_sampling_settings_and_token_parameter_reach_the_server(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          endpoints={"default": {"token_limit_param": "max_completion_tokens", "stream_usage": False}},
                          interpreter={"temperature": 0.4, "top_p": 0.9, "seed": 7, "frequency_penalty": 0.5,
                                       "presence_penalty": 0.25, "max_tokens": 77,
                                       "extra_body": {"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
                                                      "reasoning_effort": "none"}})
    code, _, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0
    (request,) = llm_server.chat_requests
    assert {key: request[key] for key in ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty",
                                          "max_completion_tokens", "top_k", "min_p", "repetition_penalty",
                                          "reasoning_effort")} == {
        "temperature": 0.4, "top_p": 0.9, "seed": 7, "frequency_penalty": 0.5, "presence_penalty": 0.25,
        "max_completion_tokens": 77, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
        "reasoning_effort": "none"}
    assert "max_tokens" not in request and "stream_options" not in request


def test_prompt_variants_are_weighted_and_stable_per_image(tmp_path, vision_server, danbooru, capsys):
    vision_server.responder = lambda request: Text("ok")
    images = tmp_path / "images"
    for n in range(60):
        make_image(images / f"{n:02}.png", size=(8 + n, 8))  # its width tells the server which image it is
    config = write_config(tmp_path / "config.yaml", vision_server.base_url, danbooru.url, tag_provider={"skip": True},
                          interpreter={"skip": True}, output={"extension": ".caption"},
                          interrogator={"skip": False, "model": "vision-model", "prompt_variants": [
                              {"style": "descriptive", "length": "long", "weight": 3},
                              {"style": "stable_diffusion", "weight": 1},
                              {"prompts": ["What is this?", "Say it in one line."], "weight": 1}]})

    def asked():
        """image width -> the first prompt it was sent with, for the requests made since `start`"""
        return {Image.open(io.BytesIO(base64.b64decode(r["messages"][0]["content"][1]["image_url"]["url"]
                                                       .split(",", 1)[1]))).size[0]:
                r["messages"][0]["content"][0]["text"] for r in vision_server.chat_requests[start:]
                if len(r["messages"]) == 1}
    start = 0
    run_caption([str(images), "--config", str(config)], capsys)
    first = asked()
    counts = {text: list(first.values()).count(text) for text in set(first.values())}
    assert set(counts) == {"Write a long descriptive caption for this image in a formal tone.",
                           "Write a stable diffusion prompt for this image.", "What is this?"}
    assert len(first) == 60 and counts["Write a long descriptive caption for this image in a formal tone."] > 25
    start = len(vision_server.chat_requests)
    run_caption([str(images), "--config", str(config), "output.overwrite=true"], capsys)
    assert asked() == first  # every image is asked the same way on a rerun
