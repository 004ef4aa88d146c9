"""Every value the config's types allow but the program does not, refused when the config
is read, each with a one-line message naming the key and what it takes."""
from __future__ import annotations

import difflib
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple

from tagcaption.errors import ConfigError
from tagcaption.outputs import check_formats
from tagcaption.vocabulary import (CATEGORIES, DANBOORU_CATEGORIES, IMAGE_FORMATS, INTERPRETER, INTERROGATOR,
                                   PROMPTED_STAGES, RETRY_MODES, SCRIPTS, STAGES, TAG_COMBINE, TAG_INPUTS,
                                   TAG_SOURCES, TOKEN_LIMIT_PARAMS)

if TYPE_CHECKING:
    from tagcaption.config import Config


RANGES: Dict[str, Dict[str, Tuple[float, Optional[float]]]] = {
    "stage": {"max_tokens": (1, None)},
    "endpoint": {"max_reply_bytes": (1, None), "stop_after_failures": (1, None)},
    "guards": {"max_attempts": (1, None)},
    "interrogator": {"jpeg_quality": (1, 100)},
}
"""The numbers a section's keys must lie within (lowest, highest or None), checked where the
section's other values are."""


def check_config(config: Config) -> None:
    """Raise ConfigError for the first value the program cannot use."""
    for check in (_check_stages, _check_endpoints, _check_tag_provider, _check_tags, _check_guards,
                  _check_variants, _check_interrogator, _check_interpreter, _check_output):
        check(config)


def _check_ranges(section: object, where: str, kind: str) -> None:
    for key, (low, high) in RANGES[kind].items():
        value = getattr(section, key)
        if value < low or (high is not None and value > high):
            bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
            raise ConfigError(f"{where}.{key} must be {bounds}")


def _either(names: Sequence[str]) -> str:
    """`a, b or c`"""
    return f"{', '.join(names[:-1])} or {names[-1]}" if len(names) > 1 else "".join(names)


def _check_stages(config: Config) -> None:
    for name in STAGES:
        stage = getattr(config, name)
        if stage.skip:
            continue
        if stage.endpoint not in config.endpoints:
            close = difflib.get_close_matches(stage.endpoint, list(config.endpoints), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; defined endpoints: {', '.join(config.endpoints)}"
            raise ConfigError(f"{name}.endpoint '{stage.endpoint}' is not defined under endpoints{hint}")
        _check_ranges(stage, name, "stage")


def _check_endpoints(config: Config) -> None:
    for name, endpoint in config.endpoints.items():
        _check_ranges(endpoint, f"endpoints.{name}", "endpoint")
        _check_concurrency(endpoint.concurrency, f"endpoints.{name}.concurrency")
        if not endpoint.request_timeout > 0:
            raise ConfigError(f"endpoints.{name}.request_timeout must be more than 0 seconds")
        if endpoint.token_limit_param not in TOKEN_LIMIT_PARAMS:
            raise ConfigError(f"endpoints.{name}.token_limit_param must be {_either(TOKEN_LIMIT_PARAMS)}")
        urls = [endpoint.base_url] if isinstance(endpoint.base_url, str) else endpoint.base_url
        if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
            raise ConfigError(f"endpoints.{name}.base_url must be a URL or a list of URLs")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"endpoints.{name}.base_url must start with http:// or https:// (got {url!r})")


def _check_concurrency(value: object, where: str) -> None:
    """A whole number from 1 to MAX_CONCURRENCY, or `auto`."""
    from tagcaption.slots import AUTO, MAX_CONCURRENCY

    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be a whole number or {AUTO} (got {value!r})")
    if not 1 <= value <= MAX_CONCURRENCY:
        raise ConfigError(f"{where} must be between 1 and {MAX_CONCURRENCY}, or {AUTO} (got {value})")


def _check_tag_provider(config: Config) -> None:
    settings = config.tag_provider
    if settings.source not in TAG_SOURCES:
        raise ConfigError(f"tag_provider.source must be {_either(TAG_SOURCES)} (got {settings.source!r})")
    if settings.danbooru_rate <= 0 or settings.danbooru_batch_size < 1:
        raise ConfigError("tag_provider.danbooru_rate and danbooru_batch_size must be positive")


def _check_tags(config: Config) -> None:
    tags = config.tags
    if not tags.sources or any(name not in TAG_INPUTS for name in tags.sources):
        raise ConfigError(f"tags.sources: use {' and/or '.join(TAG_INPUTS)} (got {list(tags.sources)})")
    if tags.combine not in TAG_COMBINE:
        raise ConfigError(f"tags.combine must be {_either(TAG_COMBINE)} (got {tags.combine!r})")
    bad = [name for name in tags.exclude_categories if name not in CATEGORIES]
    if bad:
        raise ConfigError(f"tags.exclude_categories: unknown categor{'ies' if len(bad) > 1 else 'y'} "
                          f"{', '.join(bad)} (use {', '.join(DANBOORU_CATEGORIES.values())})")


def _check_guards(config: Config) -> None:
    guards = config.guards
    _check_ranges(guards, "guards", "guards")
    if guards.retry_mode not in RETRY_MODES:
        raise ConfigError(f"guards.retry_mode must be {_either(RETRY_MODES)} (got {guards.retry_mode!r})")
    if guards.expected_script not in SCRIPTS:
        raise ConfigError(f"guards.expected_script must be one of {', '.join(SCRIPTS)}")


def _check_variants(config: Config) -> None:
    for name in PROMPTED_STAGES:
        other = INTERPRETER if name == INTERROGATOR else INTERROGATOR
        wrong = "prompt_template" if name == INTERROGATOR else "prompts"
        for index, variant in enumerate(getattr(config, name).prompt_variants):
            if variant.weight <= 0:
                raise ConfigError(f"{name}.prompt_variants[{index}].weight must be positive")
            if getattr(variant, wrong) is not None:
                raise ConfigError(f"{name}.prompt_variants[{index}].{wrong} belongs to the {other}")
    if config.interrogator.skip and config.interpreter.skip:
        raise ConfigError("interrogator.skip and interpreter.skip are both true: nothing would write a caption")


def _check_interrogator(config: Config) -> None:
    settings = config.interrogator
    if settings.image_format not in IMAGE_FORMATS:
        raise ConfigError(f"interrogator.image_format must be {_either(IMAGE_FORMATS)} "
                          f"(got {settings.image_format!r})")
    _check_ranges(settings, "interrogator", "interrogator")
    from tagcaption.hints import sources_problem  # the hint sources import the program's modules

    problem = sources_problem(settings.hint_sources)
    if problem:
        raise ConfigError(problem)


def _check_interpreter(config: Config) -> None:
    limit = config.interpreter.max_tag_descriptions
    if limit is not None and limit < 0:
        raise ConfigError("interpreter.max_tag_descriptions must be 0 or more (null: every summary)")


def _check_output(config: Config) -> None:
    if not config.output.extension.startswith("."):
        raise ConfigError(f"output.extension must start with a dot (got {config.output.extension!r})")
    if config.tags_extension and not config.tags_extension.startswith("."):
        raise ConfigError(f"tags_extension must start with a dot (got {config.tags_extension!r})")
    problem = check_formats(config.output.formats)
    if problem:
        raise ConfigError(problem)
