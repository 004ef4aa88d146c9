from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
from omegaconf import OmegaConf
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent

from fake_servers import FakeDanbooru, FakeOpenAIServer  # noqa: E402

from tagcaption import cli as caption  # noqa: E402


@pytest.fixture
def llm_server():
    server = FakeOpenAIServer(models=["instruct-model"]).start()
    yield server
    server.stop()


@pytest.fixture
def vision_server():
    server = FakeOpenAIServer(models=["vision-model"]).start()
    yield server
    server.stop()


@pytest.fixture
def danbooru():
    server = FakeDanbooru().start()
    yield server
    server.stop()


def make_image(path: Path, size=(64, 48), color=(200, 30, 30), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, **save)
    return path


def make_dataset(folder: Path, images: Dict[str, Optional[str]]) -> Dict[str, Path]:
    """Images (name → tags text, or None for no tags file) with `<stem>.txt` tag files."""
    paths = {}
    for name, tags in images.items():
        paths[name] = make_image(folder / name)
        if tags is not None:
            (folder / name).with_suffix(".txt").write_text(tags, encoding="utf-8")
    return paths


def write_config(path: Path, llm_url: str, danbooru_url: str, **sections) -> Path:
    """A config file whose endpoints point at the fake servers; `sections` override keys."""
    config = {
        "endpoints": {"default": {"base_url": llm_url, "concurrency": 4, "timeout": 10, "max_retries": 0}},
        "tag_provider": {"model": "instruct-model", "danbooru_url": danbooru_url, "danbooru_rate": 1000,
                         "cache_file": str(path.parent / "tags_cache.json")},
        "interrogator": {"model": "vision-model"},
        "interpreter": {"model": "instruct-model"},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            _deep_update(config[key], value)
        else:
            config[key] = value
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)), encoding="utf-8")
    return path


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def run_caption(args: List[str], capsys=None) -> tuple:
    """Run caption.py's main in this process; returns (exit code, stdout, stderr)."""
    code = caption.main([*args, "--no-progress"])
    if capsys is None:
        return code, "", ""
    out, err = capsys.readouterr()
    return code, out, err


def run_caption_process(args: List[str], timeout: float = 60, **extra_env: str) -> subprocess.CompletedProcess:
    """Run `python caption.py` as users do, in a child process."""
    env = {key: value for key, value in os.environ.items() if not key.endswith("_PROXY")}
    env.update(extra_env)
    return subprocess.run([sys.executable, str(ROOT / "caption.py"), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)
