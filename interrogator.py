"""Stage 2 (optional): a vision model describes the image.

One prompt is one question; several prompts are a conversation that resends the whole
history each turn, with the image in the first user turn. The last reply is the
description. The system prompt carries the global metadata file (a character list, a
universe description) so that it is the same, cacheable prefix for every image.
"""
from __future__ import annotations

import asyncio
from typing import Dict, List

from config import Config, ConfigError
from images import prepare_image
from llm import LLM
from tag_provider import TAG_VARIABLES
from templates import Template

PLACEHOLDERS = TAG_VARIABLES + ("filename", "folder", "hints")


class Interrogator:
    def __init__(self, config: Config, llm: LLM):
        self.settings = config.interrogator
        self.llm = llm
        self.metadata = ""
        if self.settings.global_metadata_file:
            path = config.resource(self.settings.global_metadata_file)
            try:
                self.metadata = path.read_text(encoding="utf-8-sig").strip()
            except OSError as exc:
                raise ConfigError(f"cannot read interrogator.global_metadata_file {path}: "
                                  f"{exc.strerror or exc}") from None
        self.system = Template(self.settings.system_prompt, PLACEHOLDERS, "interrogator.system_prompt")
        self.prompts = [Template(prompt, PLACEHOLDERS, f"interrogator.prompts[{index}]")
                        for index, prompt in enumerate(self.settings.prompts)]

    async def describe(self, path, values: Dict[str, str]) -> str:
        image = await asyncio.to_thread(prepare_image, path, self.settings.max_image_size,
                                        self.settings.jpeg_quality)
        messages: List[dict] = []
        system = "\n\n".join(part for part in (self.system.render(**values), self.metadata) if part)
        if system:
            messages.append({"role": "system", "content": system})
        reply = ""
        for turn, prompt in enumerate(self.prompts):
            text = prompt.render(**values)
            if turn == 0:
                if values.get("hints"):
                    text = f"{values['hints']}\n\n{text}"
                content = [{"type": "text", "text": text},
                           {"type": "image_url", "image_url": {"url": image.data_url}}]
            else:
                content = text
            messages.append({"role": "user", "content": content})
            reply = await self.llm.complete("interrogator", self.settings, messages)
            messages.append({"role": "assistant", "content": reply})
        return reply
