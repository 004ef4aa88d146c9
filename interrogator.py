"""Stage 2 (optional): a vision model describes the image.

One prompt is one question; several prompts are a conversation that resends the whole
history each turn, with the image in the first user turn. The last reply is the
description. The system prompt comes first and carries the global metadata file (a
character list, a universe description) so that it is the same, cacheable prefix for
every image. A server that says the request is too long for its context gets the image
once more at half the size. With no Interpreter and `output.variants: N`, the description is
the caption and is asked N times (see alternatives.py).
"""
from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Set

from tagcaption.alternatives import Distinct, ordered, sampling, single_line
from tagcaption.config import Config
from tagcaption.deadlines import off_loop
from tagcaption.errors import ConfigError, LLMError, os_error_text
from tagcaption.faithfulness import Check, ImageCheck
from tagcaption.images import ImageOptions, PreparedImage, parse_color, prepare_image, prepare_image_bytes
from tagcaption.llm import LLM
from tagcaption.placeholders import INTERROGATOR_PLACEHOLDERS, used_by
from tagcaption.postprocess import clean_caption
from tagcaption.tally import Tally
from tagcaption.templates import Template
from tagcaption.variants import Variant, build_variants, with_tags
from tagcaption.vocabulary import INTERROGATOR, TAGS_THEN_CAPTION

log = logging.getLogger("caption")

PLACEHOLDERS = INTERROGATOR_PLACEHOLDERS


class Interrogator:
    def __init__(self, config: Config, llm: LLM, tally: Optional[Tally] = None):
        self.settings = config.interrogator
        self.llm = llm
        self.tally = tally if tally is not None else Tally()
        self.metadata = ""
        if self.settings.global_metadata_file:
            path = config.resource(self.settings.global_metadata_file)
            try:
                self.metadata = path.read_text(encoding="utf-8-sig").strip()
            except OSError as exc:
                raise ConfigError(os_error_text(exc, path, "interrogator.global_metadata_file")) from None
        try:
            background = parse_color(self.settings.background)
        except ValueError as exc:
            raise ConfigError(f"interrogator.background: {exc}") from None
        self.options = ImageOptions(self.settings.max_image_size, self.settings.image_format,
                                    self.settings.jpeg_quality, background)
        self.system = Template(self.settings.system_prompt, PLACEHOLDERS, "interrogator.system_prompt")
        self.postprocess = config.postprocess
        self.file_timeout = config.file_timeout
        self.final = config.interpreter.skip
        """With no Interpreter the description is the caption: cleaned and guarded as one."""
        self.variants: List[Variant] = build_variants(config, INTERROGATOR)
        self.prompts: Dict[Variant, List[Template]] = {}
        for variant in self.variants:
            texts = [variant.instruction] if variant.style else list(variant.prompts)
            if not texts:
                raise ConfigError("interrogator.prompts is empty: give at least one prompt")
            self.prompts[variant] = [Template(text, PLACEHOLDERS, f"interrogator prompt {index + 1}")
                                  for index, text in enumerate(texts)]

    @property
    def consumes(self) -> Set[str]:
        """The image values its prompts use (the tags-then-caption output uses `booru_tags`)."""
        names = used_by(self.system, *(template for templates in self.prompts.values() for template in templates))
        if self.final and any(variant.output == TAGS_THEN_CAPTION for variant in self.variants):
            names.add("booru_tags")
        return names

    async def descriptions(self, path: Path, values: Dict[str, str], key: str, transcript: Optional[dict] = None,
                           image_data=None, count: int = 1, check: Optional[ImageCheck] = None) -> List[str]:
        """The image's description; `count` of them, each different from the ones before, when
        they are the captions (no Interpreter, `output.variants` > 1; see alternatives.py).
        `image_data`: the image itself (bytes or a PIL image) when it has no file, as a dataset
        row's; `path` then only names it. `check`: the image's faithfulness check, for a
        description that is the caption."""
        source, prepare = (path, prepare_image) if image_data is None else (image_data, prepare_image_bytes)
        image = await off_loop(prepare, source, self.options, seconds=self.file_timeout, what=f"reading {path}")
        distinct = Distinct(stage=INTERROGATOR) if count > 1 else None
        texts = []
        for index, variant in enumerate(ordered(self.variants, key, count)):
            body = sampling(self.settings, index, count)
            faithful = check.for_prompt(used_by(self.system, *self.prompts[variant]), variant.instruction,
                                        lambda text, v=variant: with_tags(v, text, values)) \
                if check and self.final else None
            try:
                text = await self._converse(image, self.prompts[variant], values, transcript, distinct, body, faithful)
            except LLMError as exc:
                if exc.kind != "context_overflow" or max(image.width, image.height) <= 64:
                    raise
                image = await self._smaller(path, source, prepare, image)
                text = await self._converse(image, self.prompts[variant], values, transcript, distinct, body, faithful)
            if distinct is not None:
                distinct.add(text)
                if transcript is not None:
                    transcript.setdefault("variants", []).append(transcript[INTERROGATOR])
            texts.append(with_tags(variant, text, values) if self.final else text)
        return texts

    async def _smaller(self, path: Path, source, prepare, image: PreparedImage) -> PreparedImage:
        """The image again at half the size, for a server that said it was too long for its context."""
        half = max(image.width, image.height) // 2
        log.warning("warning: %s: too long for the vision model's context; sending it again at %d px", path, half,
                    extra={"group": "shrunk", "item": path.name, "summary": "warning: {count} images were too "
                           "long for the vision model's context and were sent again at half size"})
        self.tally.update("images.shrunk")
        return await off_loop(prepare, source, replace(self.options, max_size=half),
                              seconds=self.file_timeout, what=f"reading {path}")

    async def _converse(self, image: PreparedImage, prompts: List[Template], values: Dict[str, str],
                        transcript: Optional[dict], distinct: Optional[Distinct] = None,
                        body: Optional[dict] = None, check: Optional[Check] = None) -> str:
        messages: List[dict] = []
        system = "\n\n".join(part for part in (self.system.render(**values), self.metadata) if part)
        if system:
            messages.append({"role": "system", "content": system})

        def finish(text: str) -> str:
            """The last answer as the caption; one line, and unlike the earlier ones, as a variant."""
            text = clean_caption(text, self.postprocess)
            if distinct is not None:
                text = single_line(text)
                distinct.check(text)
            return text
        reply = ""
        for turn, prompt in enumerate(prompts):
            last = turn == len(prompts) - 1
            text = prompt.render(**values)
            if turn == 0:
                if values.get("hints") and "hints" not in prompt.names:  # after the fixed, cacheable prompt
                    text = f"{text}\n\n{values['hints']}"
                content = [{"type": "text", "text": text},
                           {"type": "image_url", "image_url": {"url": image.data_url}}]
            else:
                content = text
            messages.append({"role": "user", "content": content})
            try:
                reply = await self.llm.complete(INTERROGATOR, self.settings, messages,
                                                clean=finish if last and self.final else None,
                                                final=last and self.final,
                                                trips=transcript.setdefault("guards", []) if transcript is not None
                                                else None, body=body, check=check if last else None)
            finally:
                if transcript is not None:
                    transcript[INTERROGATOR] = _loggable(messages, image)
            messages.append({"role": "assistant", "content": reply})
        if transcript is not None:
            transcript[INTERROGATOR] = _loggable(messages, image)
        return reply


def _loggable(messages: List[dict], image: PreparedImage) -> List[dict]:
    """The conversation so far, with the image replaced by a short placeholder."""
    placeholder = f"[image: {image.mime_type} {image.width}x{image.height}, {image.size_bytes // 1024} KB]"
    shown = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = [part if part.get("type") != "image_url" else {"type": "image_url", "image_url": placeholder}
                       for part in content]
        shown.append({"role": message["role"], "content": content})
    return shown
