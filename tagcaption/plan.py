"""The plan of a run, computed from the config and the prompts before anything runs: which
stages run, which prompts they render, and which values those prompts consume.

Work that nothing consumes is not done: tag summaries only when a rendered prompt uses
`{tag_descriptions}` (and no summary model is needed otherwise), tag lookups only when
summaries, tag categories or exclusions need them, a vision request only when its
description is used — by the caption template, as the caption, or kept in the dataset
files. With the Interrogator on and a caption template that would throw its description
away, the run stops before any request.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from tagcaption.config import Config
from tagcaption.errors import ConfigError
from tagcaption.placeholders import TAG_VARIABLES
from tagcaption.vocabulary import CATEGORIES, INTERPRETER, INTERROGATOR, STAGES, TAG_PROVIDER

CATEGORY_VARIABLES = {f"{category}_tags" for category in CATEGORIES}
KEEPS_DESCRIPTIONS = {"jsonl": "captions.jsonl", "metadata": "metadata.jsonl"}


@dataclass(frozen=True)
class Step:
    stage: str
    endpoint: str
    model: str


@dataclass(frozen=True)
class RunPlan:
    steps: Tuple[Step, ...]
    """The model requests a run makes, by stage, in pipeline order."""
    lookups: bool = False
    """Tag lookups (Danbooru or a dump): for summaries, categories, exclusions."""
    why_lookups: Tuple[str, ...] = ()
    consumed: frozenset = frozenset()
    """The image values the rendered prompts use."""
    description_to: Optional[str] = None
    """Where the Interrogator's description goes."""
    tag_inputs: Tuple[str, ...] = ()
    outputs: Tuple[str, ...] = ()
    """What each image's caption file holds when it is not one caption of plain text."""

    def runs(self, stage: str) -> bool:
        return any(step.stage == stage for step in self.steps)

    @property
    def summaries(self) -> bool:
        return self.runs(TAG_PROVIDER)

    @property
    def endpoints(self) -> Dict[str, Tuple[str, ...]]:
        """Each endpoint the run uses, with the models asked there."""
        used: Dict[str, Tuple[str, ...]] = {}
        for step in self.steps:
            models = used.get(step.endpoint, ())
            used[step.endpoint] = models if step.model in models else models + (step.model,)
        return used

    def describe(self) -> List[str]:
        """The plan in a few lines, for `check` and `--dry-run`."""
        steps = {step.stage: step for step in self.steps}
        parts = [f"tags ({', '.join(self.tag_inputs)})"]
        if self.lookups:
            parts.append(f"tag lookups (for {', '.join(self.why_lookups)})")
        if TAG_PROVIDER in steps:
            parts.append(f"summaries: {_via(steps[TAG_PROVIDER])}")
        parts.append(f"interpreter: {_via(steps[INTERPRETER])}" if INTERPRETER in steps else "no interpreter")
        lines = [" → ".join(parts)]
        if INTERROGATOR in steps:
            lines.append(f"vision: {_via(steps[INTERROGATOR])} → {self.description_to}")
        return lines + list(self.outputs)


def _via(step: Step) -> str:
    return f"{step.model} via {step.endpoint}"


def plan_run(config: Config, interrogator=None, interpreter=None) -> RunPlan:
    """The plan for the config, from the prompts of the built Interrogator and Interpreter
    (their `consumes`); without them, every configured stage is taken to run."""
    if interrogator is None and interpreter is None:
        return RunPlan(tuple(_step(config, stage) for stage in STAGES if not getattr(config, stage).skip),
                       tag_inputs=tuple(config.tags.sources))
    consumed: Set[str] = set()
    for stage in (interrogator, interpreter):
        if stage is not None:
            consumed |= stage.consumes
    lookups, why = _lookups(config, consumed)
    steps = []
    if lookups and "tag_descriptions" in consumed:
        steps.append(_step(config, TAG_PROVIDER))
    if interrogator is not None:
        steps.append(_step(config, INTERROGATOR))
    if interpreter is not None:
        steps.append(_step(config, INTERPRETER))
    return RunPlan(tuple(steps), lookups, why, frozenset(consumed),
                   _description_to(config, interrogator, interpreter), tuple(config.tags.sources),
                   _outputs(config, interpreter) + _faithfulness(config, consumed))


def _outputs(config: Config, interpreter) -> Tuple[str, ...]:
    """The plan's lines for `output.variants` and a response schema."""
    lines = []
    count = config.output.variants
    if count > 1:
        stage = INTERPRETER if interpreter is not None else INTERROGATOR
        lines.append(f"captions: {count} per image, one a line of the caption file, asked one after the other "
                     f"({stage} requests × {count}, seeds {getattr(config, stage).seed or 0}…, repeats asked again)")
    structured = getattr(interpreter, "structured", None)
    if structured is not None:
        endpoint = config.interpreter.endpoint
        how = "response_format json_schema" if getattr(interpreter, "body", None) else "the prompt only"
        template = config.interpreter.response_template or "the fields joined with \", \""
        lines.append(f"structured: JSON objects of the schema '{structured.name}' ({how}, endpoint '{endpoint}') → "
                     f"<stem>.caption.json; the caption written by {template}")
    return tuple(lines)


def _faithfulness(config: Config, consumed: Set[str]) -> Tuple[str, ...]:
    """The plan's line for the faithfulness check, when a prompt carries the image's tags."""
    mode = config.guards.faithfulness
    if mode == "off" or not consumed & set(TAG_VARIABLES):
        return ()
    what = "names of character and series tags, one eye or hair colour, the people count"
    if config.guards.contradictions:
        what += f", the opposites in {Path(config.guards.contradictions).name}"
    if config.style.omit_traits_of:
        what += f"; never {', '.join(config.style.omit_traits_of)}"
    return (f"held to the tags (guards.faithfulness: {mode}): {what}",)


def _step(config: Config, stage: str) -> Step:
    settings = getattr(config, stage)
    return Step(stage, settings.endpoint, settings.model)


def _lookups(config: Config, consumed: Set[str]) -> Tuple[bool, Tuple[str, ...]]:
    """Whether tags are looked up, and what for: nothing when no prompt uses a tag value."""
    if config.tag_provider.skip or config.tag_provider.source == "none" or not consumed & set(TAG_VARIABLES):
        return False, ()
    why = []
    if "tag_descriptions" in consumed:
        why.append("summaries")
    if consumed & CATEGORY_VARIABLES:
        why.append("categories")
    if config.tags.exclude_categories or config.tag_provider.min_post_count:
        why.append("exclusions")
    return bool(why), tuple(why)


def _description_to(config: Config, interrogator, interpreter) -> Optional[str]:
    """Where the description goes; ConfigError when it would go nowhere."""
    if interrogator is None:
        return None
    if interpreter is None:
        return "saved as the caption"
    lacking = interpreter.without("description")
    if not lacking:
        return f"{{description}} in {', '.join(sorted({Path(t.origin).name for t in interpreter.templates.values()}))}"
    kept = [name for fmt, name in KEEPS_DESCRIPTIONS.items() if fmt in config.output.formats]
    if kept:
        return f"kept in {' and '.join(kept)} (the caption template does not use it)"
    raise ConfigError(
        f"the Interrogator is on but the caption template {', '.join(lacking)} has no {{description}}: every "
        "vision request's description would be thrown away. Use a template that has it "
        "(interpreter.prompt_template=auto), or turn the Interrogator off (interrogator.skip=true)")
