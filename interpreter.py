"""Stage 3: an instruct model turns tags, tag summaries and the description into the caption,
through a prompt template from `templates/` that the user edits, or a style preset whose
instruction is put into `templates/styles/_interpreter.txt`.

With `output.variants: N` it writes N captions of the image, one after the other (see
alternatives.py); with `interpreter.response_schema` each is asked as a JSON object and
written out by the response template (see structured.py).
"""
from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Set

from tagcaption.alternatives import Caption, Distinct, ordered, sampling, single_line
from tagcaption.config import Config
from tagcaption.errors import LLMError
from tagcaption.faithfulness import ImageCheck
from tagcaption.llm import LLM
from tagcaption.placeholders import INTERPRETER_PLACEHOLDERS, STYLE_WRAPPER_PLACEHOLDERS, used_by
from tagcaption.postprocess import clean_caption
from tagcaption.structured import StructuredCaption
from tagcaption.templates import Template
from tagcaption.variants import Variant, build_variants, caption_template, style_wrapper, with_tags
from tagcaption.vocabulary import INTERPRETER, TAGS_THEN_CAPTION

PLACEHOLDERS = INTERPRETER_PLACEHOLDERS
REFUSED = (400, 422)
"""Statuses of a server refusing a request field (a response_format it does not take)."""


class Interpreter:
    def __init__(self, config: Config, llm: LLM):
        self.settings = config.interpreter
        self.postprocess = config.postprocess
        self.llm = llm
        self.count = config.output.variants
        self.structured = StructuredCaption.from_config(config)
        self.body: Dict[str, Any] = self.structured.body(config.endpoints[self.settings.endpoint].structured_output) \
            if self.structured and self.settings.endpoint in config.endpoints else {}
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

    async def captions(self, values: Dict[str, str], key: str, transcript: Optional[dict] = None,
                       check: Optional[ImageCheck] = None) -> List[Caption]:
        """The image's `output.variants` captions, each different from the ones before it;
        `check`: the image's faithfulness check, held to the prompt each variant sends."""
        distinct = Distinct("the JSON object only" if self.structured else "the caption only")
        return [await self._caption(variant, values, index, distinct, transcript, check)
                for index, variant in enumerate(ordered(self.variants, key, self.count))]

    def _messages(self, variant: Variant, values: Dict[str, str]) -> List[dict]:
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        rendered = self.templates[variant].render(**values, instruction=variant.instruction)
        prompt = re.sub(r"\n{3,}", "\n\n", rendered).strip()
        if self.structured:
            prompt = f"{prompt}\n\n{self.structured.instruction}"
        messages.append({"role": "user", "content": prompt})
        return messages

    async def _caption(self, variant: Variant, values: Dict[str, str], index: int, distinct: Distinct,
                       transcript: Optional[dict], check: Optional[ImageCheck] = None) -> Caption:
        messages = self._messages(variant, values)
        if transcript is not None and index == 0:
            transcript[INTERPRETER] = messages
        got: Dict[str, Any] = {}

        def finish(text: str) -> str:
            """The reply as the caption (read as JSON first, when structured); ReplyRejected
            when it cannot be one."""
            data = self.structured.read(text) if self.structured else None
            text = clean_caption(self.structured.render(data) if self.structured else text, self.postprocess)
            if self.count > 1:
                text = single_line(text)
                distinct.check(text)
            got["data"] = data
            return text

        faithful = check.for_prompt(self.templates[variant].names, variant.instruction,
                                    lambda text: with_tags(variant, text, values)) if check else None
        try:
            reply = await self.llm.complete(INTERPRETER, self.settings, messages, clean=finish, final=True,
                                            trips=transcript.setdefault("guards", []) if transcript is not None
                                            else None, body={**sampling(self.settings, index, self.count), **self.body},
                                            check=faithful)
        except LLMError as exc:
            if not self.body or exc.status not in REFUSED:
                raise
            raise LLMError(f"{exc} (a server that refuses response_format takes the schema in the prompt only: set "
                           f"endpoints.{self.settings.endpoint}.structured_output=none)", exc.kind, exc.attempts,
                           status=exc.status) from None
        distinct.add(reply)
        if transcript is not None:
            conversation = messages + [{"role": "assistant", "content": reply}]
            if index == 0:
                transcript[INTERPRETER] = conversation
            if self.count > 1:
                transcript.setdefault("variants", []).append(conversation)
        return Caption(with_tags(variant, reply, values), got.get("data"))
