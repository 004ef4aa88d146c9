"""The stages of one run, built once from the config and the plan.

A dry run is chosen here, when the stages are built: the LLM client that only records,
Danbooru replaced unless `--dry-run=tags`, the tag cache read but never written. Nothing
is patched into a stage afterwards.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Tuple

from tagcaption.config import Config
from tagcaption.dry_run import DryRunLLM, DryRunSource
from tagcaption.errors import ConfigError, ServerUnreachable
from tagcaption.faithfulness import Faithfulness
from tagcaption.interpreter import Interpreter
from tagcaption.interrogator import Interrogator
from tagcaption.llm import LLM
from tagcaption.plan import RunPlan, plan_run
from tagcaption.tag_cache import TagCache
from tagcaption.tag_provider import TagFilter, TagProvider
from tagcaption.tally import Tally

log = logging.getLogger("caption")


@dataclass
class Stages:
    llm: LLM
    plan: RunPlan
    tag_filter: TagFilter
    tag_provider: Optional[TagProvider]
    interrogator: Optional[Interrogator]
    interpreter: Optional[Interpreter]
    faithfulness: Optional[Faithfulness] = None

    def named(self) -> Iterator[Tuple[str, object]]:
        yield from (("tag_provider", self.tag_provider), ("interrogator", self.interrogator),
                    ("interpreter", self.interpreter))

    async def close(self) -> None:
        if self.tag_provider:
            await self.tag_provider.close()
        await self.llm.close()


def build_stages(config: Config, tally: Tally, dry_run: Optional[str] = None, refresh_tags: bool = False) -> Stages:
    """The stages the plan needs. `dry_run`: None, "llm" (no model request, no file written) or
    "tags" (Danbooru may be asked)."""
    llm = LLM.from_config(config, tally=tally)
    if dry_run:
        llm = DryRunLLM(llm)
    interrogator = None if config.interrogator.skip else Interrogator(config, llm, tally=tally)
    interpreter = None if config.interpreter.skip else Interpreter(config, llm)
    plan = plan_run(config, interrogator, interpreter)
    tag_provider = None
    if plan.lookups:
        cache = TagCache(config.path(config.tag_provider.cache_file), read_only=bool(dry_run))
        tag_provider = TagProvider(config, llm, tally, cache=cache, refresh=refresh_tags, summarise=plan.summaries,
                                   source=DryRunSource() if dry_run == "llm" else None)
    return Stages(llm, plan, TagFilter(config.tags, config.tag_provider.min_post_count, config.style.omit_traits_of),
                  tag_provider, interrogator, interpreter, Faithfulness(config))


async def check_servers(stages: Stages, plan: RunPlan) -> None:
    """Fail fast (exit 2) when a server the run needs does not answer at all."""
    for name, models in plan.endpoints.items():
        endpoint = stages.llm.endpoints[name]
        try:
            listed = await endpoint.list_models()
        except ServerUnreachable as exc:
            raise ConfigError(str(exc)) from None
        for model in models:
            if listed and model not in listed:
                log.warning("warning: model '%s' is not listed by %s (it lists: %s)",
                            model, endpoint.describe(), ", ".join(listed[:8]))
