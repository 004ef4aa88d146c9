"""Stage 3: an instruct model turns tags, tag summaries and the description into the caption,
through a prompt template from `templates/` that the user edits, or a style preset whose
instruction is put into `templates/styles/_interpreter.txt`."""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Set

from tagcaption.config import Config
from tagcaption.faithfulness import ImageCheck
from tagcaption.llm import LLM
from tagcaption.placeholders import INTERPRETER_PLACEHOLDERS, STYLE_WRAPPER_PLACEHOLDERS, used_by
from tagcaption.postprocess import clean_caption
from tagcaption.templates import Template
from tagcaption.variants import Variant, build_variants, caption_template, pick, style_wrapper, with_tags
from tagcaption.vocabulary import INTERPRETER, TAGS_THEN_CAPTION

PLACEHOLDERS = INTERPRETER_PLACEHOLDERS


class Interpreter:
    def __init__(self, config: Config, llm: LLM):
        self.settings = config.interpreter
        self.postprocess = config.postprocess
        self.llm = llm
        self.variants: List[Variant] = build_variants(config, INTERPRETER)
        self.templates: Dict[Variant, Template] = {}
        for variant in self.variants:
            if variant.style:
                self.templates[variant] = Template.load(config.resource(style_wrapper(config)),
                                                        STYLE_WRAPPER_PLACEHOLDERS)
            else:
                self.templates[variant] = Template.load(config.resource(caption_template(config, variant)),
                                                        PLACEHOLDERS)

    @property
    def consumes(self) -> Set[str]:
        """The image values its templates use (the tags-then-caption output uses `booru_tags`)."""
        names = used_by(*self.templates.values())
        if any(variant.output == TAGS_THEN_CAPTION for variant in self.variants):
            names.add("booru_tags")
        return names

    def without(self, name: str) -> List[str]:
        """The templates that do not use `{name}`."""
        return [template.origin for template in self.templates.values() if name not in template.names]

    async def caption(self, values: Dict[str, str], key: str, transcript: Optional[dict] = None,
                      check: Optional[ImageCheck] = None) -> str:
        """`check`: the image's faithfulness check, held to the prompt the variant sends."""
        variant = pick(self.variants, key)
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        rendered = self.templates[variant].render(**values, instruction=variant.instruction)
        messages.append({"role": "user", "content": re.sub(r"\n{3,}", "\n\n", rendered).strip()})
        if transcript is not None:
            transcript[INTERPRETER] = messages
        faithful = check.for_prompt(self.templates[variant].names, variant.instruction,
                                    lambda text: with_tags(variant, text, values)) if check else None
        reply = await self.llm.complete(INTERPRETER, self.settings, messages,
                                        clean=lambda text: clean_caption(text, self.postprocess), final=True,
                                        trips=transcript.setdefault("guards", []) if transcript is not None else None,
                                        check=faithful)
        if transcript is not None:
            transcript[INTERPRETER] = messages + [{"role": "assistant", "content": reply}]
        return with_tags(variant, reply, values)
