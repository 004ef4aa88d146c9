"""How a stage is prompted for one image: from a style preset or the stage's own prompts,
and, with `prompt_variants`, one of several such ways picked per image by weight.

The pick depends only on the image's path, so a rerun asks the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Sequence, Tuple

from tagcaption.config import Config, VariantConfig
from tagcaption.errors import ConfigError
from tagcaption.selection import stable_fraction
from tagcaption.styles import check_length, extra_options, instruction, load_style
from tagcaption.vocabulary import CAPTION, TAGS_THEN_CAPTION


@dataclass(frozen=True)
class Variant:
    style: Optional[str]
    instruction: str
    """The style's instruction, `{name}` filled ("" when the stage's own prompts are used)."""
    output: str
    """caption | tags_then_caption"""
    weight: float
    prompts: Tuple[str, ...] = ()
    prompt_template: Optional[str] = None


def build_variants(config: Config, stage: str) -> List[Variant]:
    settings = getattr(config, stage)
    base = VariantConfig(style=settings.style, prompts=list(getattr(settings, "prompts", []) or []) or None,
                         prompt_template=getattr(settings, "prompt_template", None))
    configured = settings.prompt_variants or [VariantConfig()]
    variants = []
    for index, choice in enumerate(configured):
        where = f"{stage}.prompt_variants[{index}]" if settings.prompt_variants else stage
        variants.append(_variant(config, _merge(base, choice), where))
    return variants


def _merge(base: VariantConfig, variant: VariantConfig) -> VariantConfig:
    """A variant naming a style or its own prompts replaces the base's way of prompting;
    its length, word count and extra options (when set) override the `style` section's."""
    own = variant.style is not None or variant.prompts is not None or variant.prompt_template is not None
    source = variant if own else base
    return replace(variant, style=source.style, prompts=source.prompts, prompt_template=source.prompt_template)


def _variant(config: Config, variant: VariantConfig, where: str) -> Variant:
    prompts = tuple(variant.prompts or ())
    if not variant.style:
        return Variant(None, "", CAPTION, variant.weight, prompts, variant.prompt_template)
    style = load_style(config, variant.style)
    length = variant.length if variant.length is not None else config.style.length
    check_length(str(length))
    word_count = variant.word_count if variant.word_count is not None else config.style.word_count
    options = variant.extra_options if variant.extra_options is not None else config.style.extra_options
    text = instruction(style, str(length), word_count, list(options), extra_options(config))
    if "{name}" in text:
        if not config.style.name:
            raise ConfigError(f"{where}: the 'name' extra option needs style.name (the name to use)")
        text = text.replace("{name}", config.style.name)
    return Variant(style.name, text, style.output, variant.weight, prompts, variant.prompt_template)


AUTO = "auto"
AUTO_TEMPLATES = {True: "templates/interpreter_prompt_template_short.txt",
                  False: "templates/interpreter_prompt_template_short_no_description.txt"}
"""`interpreter.prompt_template: auto`: with the Interrogator on, the template that uses its description."""
STYLE_WRAPPERS = {True: "templates/styles/_interpreter.txt", False: "templates/styles/_interpreter_tags_only.txt"}
"""The Interpreter's wrapper for a style's instruction, with or without a description to use."""


def caption_template(config: Config, variant: Variant) -> str:
    """The Interpreter's template file for a variant (`auto` chosen by whether vision is on)."""
    name = variant.prompt_template or AUTO
    return AUTO_TEMPLATES[not config.interrogator.skip] if name == AUTO else name


def style_wrapper(config: Config) -> str:
    return STYLE_WRAPPERS[not config.interrogator.skip]


def pick(variants: Sequence[Variant], key: str) -> Variant:
    """The variant for an image, chosen by weight from a hash of its path (stable across runs)."""
    if len(variants) == 1:
        return variants[0]
    point = stable_fraction(key)
    total = sum(variant.weight for variant in variants)
    running = 0.0
    for variant in variants:
        running += variant.weight / total
        if point < running:
            return variant
    return variants[-1]


def with_tags(variant: Variant, text: str, values: Dict[str, str]) -> str:
    """The tags + description format: the image's own (filtered) tags, then the model's text."""
    if variant.output == TAGS_THEN_CAPTION and values.get("booru_tags"):
        return f"{values['booru_tags']}, {text}"
    return text
