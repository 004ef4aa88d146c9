"""One tag's summary: its wiki text through the summary template to the instruct model.

A summary is current while it was made by the configured model with the same template
(and system prompt), known by a hash; a summary the model refused (or that kept tripping
another guard) is remembered as none for that model and template, so reruns do not ask again.
"""
from __future__ import annotations

import hashlib
import logging
import time

from tagcaption.config import Config
from tagcaption.errors import GuardTripped, LLMError
from tagcaption.llm import LLM
from tagcaption.postprocess import only_text
from tagcaption.placeholders import SUMMARY_PLACEHOLDERS
from tagcaption.tally import Tally
from tagcaption.templates import Template
from tagcaption.vocabulary import TAG_PROVIDER

log = logging.getLogger("caption")


class Summariser:
    def __init__(self, config: Config, llm: LLM, tally: Tally):
        self.settings = config.tag_provider
        self.llm = llm
        self.tally = tally
        self.template = Template.load(config.resource(self.settings.prompt_template), SUMMARY_PLACEHOLDERS)
        self.template_hash = hashlib.sha1(
            f"{self.settings.system_prompt}\x00{self.template.render(tag=chr(1), wiki=chr(2))}".encode()).hexdigest()[:12]

    def is_current(self, entry: dict) -> bool:
        """Whether the entry's summary (or refusal) needs no new request."""
        if entry.get("refused"):
            return entry.get("model") == self.settings.model and entry.get("template") == self.template_hash
        if not entry.get("summary"):
            return False
        if "model" not in entry:  # from the original script's cache: keep it
            return True
        return entry.get("model") == self.settings.model and entry.get("template") == self.template_hash

    async def summarise(self, tag: str, entry: dict, again: bool = False) -> dict:
        """`entry` with the tag's summary made from its `wiki` (or its refusal); `again`: the
        entry had a summary made by another model or template. An LLMError other than a guard
        that kept tripping is raised (counted `tags.failed`)."""
        messages = []
        if self.settings.system_prompt:
            messages.append({"role": "system", "content": self.settings.system_prompt})
        messages.append({"role": "user", "content": self.template.render(tag=tag.replace("_", " "),
                                                                         wiki=entry["wiki"])})
        try:
            summary = " ".join(only_text(await self.llm.complete(TAG_PROVIDER, self.settings, messages)).split())
        except LLMError as exc:
            if not isinstance(exc, GuardTripped):
                self.tally.update("tags.failed")
                raise
            self.tally.update("tags.refused")
            log.warning("warning: tag '%s' has no summary: %s", tag, exc, extra={
                "group": "no_summary", "item": tag, "summary": "warning: {count} tags have no summary (the model's "
                "replies tripped a guard; they are marked refused in the tag cache)"})
            return dict(entry, summary=None, refused=str(exc), model=self.settings.model, template=self.template_hash)
        self.tally.update("tags.resummarised" if again else "tags.summarised")
        return dict(entry, summary=summary, model=self.settings.model, template=self.template_hash,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
