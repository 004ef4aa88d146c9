"""The config every hostile test starts from: tags only, no Danbooru, every wait short so a
case that hangs fails fast. Each test module adds its own defaults (`defaults`), and a case
its own sections, merged one level deep over them."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

from conftest import write_config
from hostile_servers import KNOWLEDGE_TEMPLATE, template

SHORT = {"tag_provider": {"skip": True}, "endpoints": {"default": {"max_retries": 0, "timeout": 5}},
         "file_timeout": 2, "stop_grace": 1}


def short_config(tmp_path: Path, llm, booru, *, defaults: Optional[dict] = None, **sections) -> Path:
    sections.setdefault("interpreter", {})
    sections["interpreter"].setdefault("prompt_template", template(tmp_path))
    base = copy.deepcopy(SHORT)
    for layer in (defaults or {}, sections):
        for key, value in layer.items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) \
                else value
    return write_config(tmp_path / "config.yaml", llm.base_url, booru.url, **base)


def with_danbooru(config, tmp_path: Path, llm, booru, *, danbooru_timeout: float = 2, **sections) -> Path:
    """`config` (a module's own config function) with Danbooru and tag summaries: the caption
    template uses {tag_descriptions}."""
    provider = {"skip": False, "danbooru_timeout": danbooru_timeout, "danbooru_retries": 0,
                **sections.pop("tag_provider", {})}
    return config(tmp_path, llm, booru, tag_provider=provider,
                  interpreter={"prompt_template": template(tmp_path, KNOWLEDGE_TEMPLATE, "knowledge.txt")}, **sections)
