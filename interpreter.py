"""Stage 3: an instruct model turns tags, tag summaries and the description into the caption,
through a prompt template from `templates/` that the user edits."""
from __future__ import annotations

import re
from typing import Dict, Optional

from config import Config
from llm import LLM
from tag_provider import TAG_VARIABLES
from templates import Template

PLACEHOLDERS = TAG_VARIABLES + ("description", "hints", "filename", "folder", "name")


class Interpreter:
    def __init__(self, config: Config, llm: LLM):
        self.settings = config.interpreter
        self.llm = llm
        self.template = Template.load(config.resource(self.settings.prompt_template), PLACEHOLDERS)

    async def caption(self, values: Dict[str, str], transcript: Optional[dict] = None) -> str:
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        prompt = re.sub(r"\n{3,}", "\n\n", self.template.render(**values)).strip()
        messages.append({"role": "user", "content": prompt})
        if transcript is not None:
            transcript["interpreter"] = messages
        reply = await self.llm.complete("interpreter", self.settings, messages)
        if transcript is not None:
            transcript["interpreter"] = messages + [{"role": "assistant", "content": reply}]
        return reply
