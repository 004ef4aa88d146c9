"""check, dry runs, samples, dataset outputs, the review page, examples and packaging (issue 8)."""
from __future__ import annotations

import asyncio

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tagcaption.config import load_config
from conftest import ROOT, make_dataset, make_image, run_caption, write_config
from fake_servers import Error, Text, user_text


def three_stage_config(tmp_path, llm_server, vision_server, danbooru, **sections):
    return write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                        endpoints={"vision": {"base_url": vision_server.base_url}},
                        interrogator={"skip": False, "endpoint": "vision", "system_prompt": "Look closely.",
                                      "prompts": ["What is in {filename}?", "Now in one sentence."],
                                      "hint_sources": ["full_path"]},
                        interpreter={"prompt_template": "templates/interpreter_prompt_template_short.txt"},
                        **sections)


# --- check -------------------------------------------------------------------------------

def test_check_passes_when_everything_works(tmp_path, llm_server, vision_server, danbooru, capsys):
    danbooru.wiki = {"1girl": "One girl."}
    config = three_stage_config(tmp_path, llm_server, vision_server, danbooru)
    code, out, _ = run_caption(["check", "--config", str(config)], capsys)
    assert code == 0, out
    assert "Everything this config needs works." in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("tag_", "inter"))}
    assert rows["interrogator"][3:7] == ["yes", "yes", "ok", "ok"]
    assert rows["interpreter"][3:7] == ["yes", "yes", "ok", "-"]
    assert "tag source: Danbooru at" in out and ": ok," in out
    vision_request = vision_server.chat_requests[-1]
    assert vision_request["messages"][0]["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert list(tmp_path.iterdir()) == [config]  # nothing written


def test_check_spots_a_port_typo(tmp_path, llm_server, danbooru, capsys):
    wrong = llm_server.base_url.replace(str(llm_server.port), str(llm_server.port + 1))
    config = write_config(tmp_path / "config.yaml", wrong, danbooru.url)
    code, out, _ = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    assert f"nothing answers at {wrong}: start the server or fix the port" in out
    assert f"a server answers at {llm_server.base_url}" in out and f"typo for {llm_server.port}" in out


def test_check_spots_a_model_that_cannot_see_and_a_missing_model(tmp_path, llm_server, vision_server, danbooru,
                                                                 capsys):
    vision_server.responder = lambda request: Error(500, {"error": {
        "code": 500, "type": "server_error", "message": "image input is not supported - hint: provide the mmproj"}}) \
        if isinstance(request["messages"][0]["content"], list) else Text("OK")
    config = three_stage_config(tmp_path, llm_server, vision_server, danbooru,
                                tag_provider={"model": "not-loaded-model"})
    code, out, _ = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2
    assert "the model cannot see images" in out and "--mmproj" in out
    assert "warning: 'not-loaded-model' is not among the models listed (instruct-model)" in out


def test_check_loads_templates_and_refuses_unknown_hint_sources(tmp_path, llm_server, danbooru, capsys):
    danbooru.wiki = {"1girl": "One girl."}
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          interpreter={"prompt_template": "nope.txt"})
    code, out, _ = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2 and "cannot read template" in out and "nope.txt" in out
    code, _, err = run_caption(["check", "--config", str(config), "interrogator.hint_sources=[bogus]"], capsys)
    assert code == 2 and "error: interrogator.hint_sources: unknown source(s) bogus" in err


def test_check_reports_an_unreachable_danbooru(tmp_path, llm_server, capsys):
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, "http://127.0.0.1:9",
                          tag_provider={"danbooru_retries": 0})
    code, out, _ = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2 and "tag source: Danbooru at http://127.0.0.1:9: failed: cannot reach" in out


# --- dry run and sample ------------------------------------------------------------------

def test_dry_run_shows_every_prompt_and_sends_nothing(tmp_path, llm_server, vision_server, danbooru, capsys):
    danbooru.wiki = {"cat": "A cat."}
    images = tmp_path / "images"
    make_dataset(images, {f"{n}.png": "cat, outdoors" for n in range(5)})
    before = sorted(p.name for p in images.iterdir())
    config = three_stage_config(tmp_path, llm_server, vision_server, danbooru)
    code, out, _ = run_caption([str(images), "--config", str(config), "--dry-run", "--preview", "2"], capsys)
    assert code == 0, out
    assert llm_server.chat_requests == [] and vision_server.chat_requests == [] and danbooru.requests == []
    assert sorted(p.name for p in images.iterdir()) == before and not (tmp_path / "tags_cache.json").exists()
    assert out.count("=== ") == 3 and "=== 0.png ===" in out and "=== 1.png ===" in out
    assert "=== tag summary request (one of them) ===" in out and "[the wiki page of 'cat' would be here]" in out
    assert "[system]\nLook closely." in out
    assert "What is in 0.png?\n\nFile path: 0.png\n<image [image: image/png 64x48," in out
    assert "[user]\nNow in one sentence." in out
    assert "Tags attached to the image:\ncat, outdoors" in out
    assert "interrogator: 10 requests" in out and "and 10 images" in out and "interpreter:  5 requests" in out
    assert "tag_provider: 2 requests" in out  # cat and outdoors: at most two summaries

    code, out, _ = run_caption([str(images), "--config", str(config), "--dry-run=tags"], capsys)
    assert code == 0 and sorted(danbooru.looked_up()) == ["cat", "outdoors"]
    assert "=== tag summary request (one of them) ===" in out and "A cat." in out
    assert llm_server.chat_requests == [] and not (tmp_path / "tags_cache.json").exists()


def test_sample_captions_n_images_picked_by_seed(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {f"{n:02}.png": f"tag{n}" for n in range(20)})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption"})
    code, out, _ = run_caption([str(images), "--config", str(config), "--sample", "4", "--seed", "7"], capsys)
    assert code == 0 and "4 captioned" in out
    first = sorted(p.name for p in images.glob("*.caption"))
    for path in images.glob("*.caption"):
        path.unlink()
    run_caption([str(images), "--config", str(config), "--sample", "4", "--seed", "7"], capsys)
    assert sorted(p.name for p in images.glob("*.caption")) == first and len(first) == 4


# --- outputs and the review page -----------------------------------------------------------

def test_jsonl_and_metadata_outputs_stay_consistent_on_reruns(tmp_path, llm_server, danbooru, capsys):
    replies = iter(f"Caption {n}." for n in range(100))
    llm_server.responder = lambda request: Text(next(replies))
    images = tmp_path / "images"
    make_dataset(images / "sub", {"b.png": "dog"})
    make_dataset(images, {"a.png": "cat, blue_sky"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          recursive=True, output={"extension": ".caption", "formats": ["txt", "jsonl", "metadata"]})
    run_caption([str(images), "--config", str(config)], capsys)
    run_caption([str(images), "--config", str(config), "output.overwrite=true"], capsys)
    captions = [json.loads(line) for line in (images / "captions.jsonl").read_text().splitlines()]
    assert [c["file"] for c in captions] == ["a.png", "sub/b.png"]
    assert [c["caption"] for c in captions] == [(images / "a.caption").read_text(),
                                                (images / "sub" / "b.caption").read_text()]
    assert captions[0]["tags"] == "cat, blue sky" and captions[0]["models"] == {"interpreter": "instruct-model"}
    metadata = [json.loads(line) for line in (images / "metadata.jsonl").read_text().splitlines()]
    assert metadata == [{"file_name": "a.png", "text": captions[0]["caption"], "tags": "cat, blue sky"},
                        {"file_name": "sub/b.png", "text": captions[1]["caption"], "tags": "dog"}]
    assert not (images / ".tagcaption" / "journal.jsonl").exists()  # merged


def test_metadata_loads_with_hugging_face_datasets(tmp_path, llm_server, danbooru, capsys):
    datasets = pytest.importorskip("datasets")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption", "formats": ["txt", "metadata"]})
    run_caption([str(images), "--config", str(config)], capsys)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(images), split="train")
    assert sorted(loaded["text"]) == sorted(p.read_text() for p in images.glob("*.caption"))


def test_formats_must_include_txt(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url,
                          output={"formats": ["jsonl"]})
    code, _, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 2 and "output.formats must include txt" in err


def chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def rendered(page: Path, fragment: str = "") -> str:
    """The page's DOM after its script ran, from headless Chromium."""
    result = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={page.parent / '.chromium'}", "--virtual-time-budget=2000", "--dump-dom",
         page.as_uri() + fragment], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_review_page_shows_descriptions_and_guard_trips(tmp_path, llm_server, vision_server, danbooru, capsys):
    vision_server.responder = lambda request: Text("A tabby cat asleep.")
    replies = iter(["I'm sorry, I can't help with that.", "A cat sleeps on a mat.", "A dog."])
    llm_server.responder = lambda request: Text(next(replies))
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    config = three_stage_config(tmp_path, llm_server, vision_server, danbooru, tag_provider={"skip": True},
                                output={"extension": ".caption", "report": True})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0, out
    text = (images / "captions.html").read_text()
    assert '<div class="description">A tabby cat asleep.</div>' in text
    assert 'data-kind="captioned guards"' in text and '<span class="badge">refusal</span>' in text


def test_review_page(tmp_path, llm_server, danbooru, capsys):
    llm_server.responder = lambda request: Error(400, {"error": "bad"}) if "dog" in user_text(request) else \
        Text("A cat on a <b>mat</b>.")
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat", "b.png": "dog", "c.png": "cat, hat"})
    make_image(images / "d.png")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption", "report": True})
    code, out, _ = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 1 and f"Review page: {images / 'captions.html'}" in out
    page = images / "captions.html"
    text = page.read_text()
    assert text.index('data-kind="failed"') < text.index('data-kind="captioned"')
    assert "A cat on a &lt;b&gt;mat&lt;/b&gt;." in text and 'src="a.png"' in text
    (images / "captions.html").unlink()
    code, out, _ = run_caption(["report", str(images), "--config", str(config)], capsys)
    assert code == 0 and page.exists()
    if not chromium():
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    dom = rendered(page)
    assert dom.count('<article class="card') == 4 and "4 of 4 images" in dom
    failed = rendered(page, "#filter=failed")  # b.png (HTTP 400) and d.png (no tags)
    assert "2 of 4 images" in failed and failed.count("<article") - failed.count("hidden=") == 2
    search = rendered(page, "#q=hat")
    assert "1 of 4 images" in search


# --- examples and packaging -----------------------------------------------------------------

@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda path: path.stem)
def test_example_configs_are_valid(example, monkeypatch):
    for name in ("OPENAI_API_KEY", "OPENROUTER_API_KEY", "GEMINI_API_KEY"):
        monkeypatch.setenv(name, "sk-example")
    config = load_config(str(example))
    from tagcaption.interpreter import Interpreter
    from tagcaption.interrogator import Interrogator
    from tagcaption.llm import LLM
    llm = LLM.from_config(config)
    if not config.interpreter.skip:
        Interpreter(config, llm)
    if not config.interrogator.skip:
        Interrogator(config, llm)


def test_the_wheel_installs_one_import_name_and_the_caption_command(tmp_path):
    """`pip install .` adds `tagcaption` and nothing else to site-packages (names like
    `config` or `llm` would shadow other packages), and the installed command finds its
    shipped config and templates inside the package."""
    pytest.importorskip("setuptools")
    source = tmp_path / "source"  # a copy: building writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "tests", "build", "*.egg-info",
                                                               "__pycache__", "tags_cache.json*"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                             "-w", str(tmp_path), str(source)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "setuptools" in result.stderr:
        pytest.skip("setuptools too old to build here")
    assert result.returncode == 0, result.stderr[-2000:]
    import zipfile
    (wheel,) = tmp_path.glob("tagcaption-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")} == {"tagcaption"}
    program = [f"tagcaption/{path.name}" for path in (ROOT / "tagcaption").glob("*.py")]
    user = [f"tagcaption/{path.relative_to(ROOT).as_posix()}" for pattern in
            ("*.py", "hints/*.py", "templates/**/*.txt", "templates/**/*.json", "config.yaml") for path in ROOT.glob(pattern)
            if path.name not in ("setup.py", "caption.py")]
    assert [name for name in program + user if name not in names] == []
    entry = next(name for name in names if name.endswith("entry_points.txt"))
    assert "caption = tagcaption.cli:cli" in zipfile.ZipFile(wheel).read(entry).decode()

    target = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target",
                             str(target), str(wheel)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {path.name for path in target.iterdir() if not path.name.endswith(".dist-info")} <= {"tagcaption", "bin"}
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    env = dict(os.environ, PYTHONPATH=str(target))
    for command in (["--version"], [str(images), "--dry-run", "tag_provider.source=none", "--no-progress"]):
        ran = subprocess.run([str(target / "bin" / "caption"), *command], capture_output=True, text=True,
                             timeout=60, cwd=tmp_path, env=env)
        assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.count("Dry run") and str(target / "tagcaption") in subprocess.run(
        [sys.executable, "-c", "import tagcaption; print(tagcaption.DATA_DIR)"], capture_output=True, text=True,
        cwd=tmp_path, env=env).stdout


def test_sample_must_be_positive(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        run_caption([str(tmp_path), "--sample", "0"])
    assert raised.value.code == 2 and "--sample takes a number of images" in capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit):
        run_caption(["--version"])
    assert capsys.readouterr().out.startswith("tagcaption ")


def test_unwritable_dataset_files_cost_a_line_not_the_captions(tmp_path, llm_server, danbooru, capsys):
    images = tmp_path / "images"
    make_dataset(images, {"a.png": "cat"})
    (images / "metadata.jsonl").mkdir()  # in the way of the file to write
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          output={"extension": ".caption", "formats": ["txt", "metadata"]})
    code, out, err = run_caption([str(images), "--config", str(config)], capsys)
    assert code == 0 and "1 captioned" in out and (images / "a.caption").exists()
    assert "error: cannot write the dataset files" in err and "Traceback" not in err
    assert (images / ".tagcaption" / "records.jsonl").exists()  # kept for the next run to merge
    assert (images / ".tagcaption" / "lock").read_text() == ""


def test_report_without_a_folder_is_a_setup_error(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("images_dir: null\n")
    code, _, err = run_caption(["report", "--config", str(config)], capsys)
    assert code == 2 and "no images folder" in err


def test_the_progress_bar_counts_the_whole_folder_while_the_walk_goes_on(tmp_path, llm_server, danbooru, capsys,
                                                                          monkeypatch):
    """The folder is walked as captioning goes (its total comes from a count of names): the
    bar must end at every image of the folder, the captioned ones counted done as found."""
    from tagcaption import selection
    from tagcaption.config import load_config
    from tagcaption.run import Run, RunOptions
    from tagcaption.summary import format_summary

    monkeypatch.setattr(selection, "SCAN_CHUNK", 1)  # a turn of the event loop after every image
    images = tmp_path / "images"
    make_dataset(images, {f"{folder}/{n:03}.png": f"tag{n}" for folder in ("a", "b") for n in range(70)})
    for n in range(0, 70, 2):
        (images / "b" / f"{n:03}.caption").write_text("Written by hand.", encoding="utf-8")
    config = write_config(tmp_path / "config.yaml", llm_server.base_url, danbooru.url, tag_provider={"skip": True},
                          recursive=True, output={"extension": ".caption"})
    result = asyncio.run(Run(load_config(str(config), [], str(images)), RunOptions(progress=True)).execute())
    err = capsys.readouterr().err
    assert "105 captioned, 35 skipped (caption exists)" in format_summary(result)
    bar_states = [tuple(map(int, state)) for state in re.findall(r"images:\s+\d+%\S*\s*\|[^|]*\|\s*(\d+)/(\d+)", err)]
    assert result.tally["images.selected"] == 140
    assert bar_states[-1] == (140, 140), bar_states[-3:]
    assert all(done <= total for done, total in bar_states)


class OddModels(__import__("fake_servers").FakeOpenAIServer):
    """Answers `GET /v1/models` with `models_body` (whatever it is; `loop`: a redirect to itself,
    `badgzip`: a body marked gzip that is not); chat as usual."""
    models_body: object = None

    def handle(self, handler, method, path, query, body) -> None:
        if method == "GET" and path == "/v1/models" and self.models_body in ("loop", "badgzip"):
            loop = self.models_body == "loop"
            handler.send_response(302 if loop else 200)
            handler.send_header("Location" if loop else "Content-Encoding", "/v1/models" if loop else "gzip")
            handler.send_header("Content-Length", "9")
            handler.end_headers()
            handler.wfile.write(b"not gzip!")
        elif method == "GET" and path == "/v1/models":
            handler.send_body(200, self.models_body)
        else:
            super().handle(handler, method, path, query, body)


@pytest.mark.parametrize("models_body", [[], "null", "text", "<html>web UI</html>", {"data": "x"},
                                         {"object": "list"}, {"data": [{"id": 5}]}, "loop", "badgzip"])
def test_check_reads_a_model_list_as_the_run_does_whatever_it_holds(tmp_path, danbooru, capsys, models_body):
    server = OddModels(models=["instruct-model"]).start()
    try:
        server.models_body = models_body
        config = write_config(tmp_path / "config.yaml", server.base_url, danbooru.url,
                              tag_provider={"source": "none"})
        code, out, err = run_caption(["check", "--config", str(config)], capsys)
    finally:
        server.stop()
    assert "unexpected" not in out + err and code in (0, 2), out + err
    assert re.search(r"interpreter\s+default\s+instruct-model\s+yes\s+(\?|no|yes)\s+ok", out), out


def test_check_names_a_base_url_without_its_v1(tmp_path, llm_server, danbooru, capsys):
    config = write_config(tmp_path / "config.yaml", llm_server.url, danbooru.url, tag_provider={"source": "none"})
    code, out, err = run_caption(["check", "--config", str(config)], capsys)
    assert code == 2 and f"set endpoints.default.base_url={llm_server.url}/v1" in out + err
    assert "load the model" not in out + err and not llm_server.chat_requests
