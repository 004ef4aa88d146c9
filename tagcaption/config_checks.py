"""Every value the config's types allow but the program does not, refused when the config
is read, each with a one-line message naming the key and what it takes."""
from __future__ import annotations

import difflib
import math
from typing import TYPE_CHECKING, Dict, Optional, Sequence, Tuple, Union

from tagcaption.config_errors import check_text_lists
from tagcaption.errors import ConfigError
from tagcaption.outputs import check_formats
from tagcaption.vocabulary import (CATEGORIES, DANBOORU_CATEGORIES, FAITHFULNESS_MODES, IMAGE_EXTENSIONS,
                                   IMAGE_FORMATS, INTERPRETER, INTERROGATOR, MAX_VARIANTS, PROMPTED_STAGES,
                                   RETRY_MODES, SCRIPTS, STAGES, STRUCTURED_OUTPUTS, TAG_COMBINE, TAG_INPUTS,
                                   TAG_SOURCES, TOKEN_LIMIT_PARAMS, TRANSPORTS)

if TYPE_CHECKING:
    from tagcaption.config import Config


ABOVE_ZERO = ">0"
"""As a lowest value: more than 0 (a timeout or a rate of 0 means nothing useful)."""
RANGES: Dict[str, Dict[str, Tuple[Union[str, float], Optional[float]]]] = {
    "stage": {"max_tokens": (1, None)},
    "endpoint": {"timeout": (ABOVE_ZERO, None), "max_retries": (0, 1000),
                 "retry_backoff": (0, None), "retry_max_backoff": (0, None), "down_after": (ABOVE_ZERO, None),
                 "rest_after": (1, None), "rest_seconds": (0, None),
                 "max_reply_bytes": (1, None), "stop_after_failures": (1, None)},
    "tag_provider": {"danbooru_rate": (ABOVE_ZERO, None), "danbooru_batch_size": (1, 1000),
                     "danbooru_concurrency": (1, 64), "danbooru_timeout": (ABOVE_ZERO, None),
                     "danbooru_retries": (0, 1000), "negative_ttl_days": (0, None), "wiki_max_chars": (0, None),
                     "min_post_count": (0, None), "outage_minutes": (0, None)},
    "guards": {"max_attempts": (1, 20), "repeat_limit": (2, None), "max_other_script": (0, 1)},
    "interrogator": {"jpeg_quality": (1, 100), "max_image_size": (0, None)},
    "postprocess": {"max_words": (1, None)},
    "run": {"stop_grace": (0, None), "file_timeout": (ABOVE_ZERO, None)},
    "dataset": {"save_interval": (1, None)},
    "output": {"variants": (1, MAX_VARIANTS)},
}
"""The numbers a section's keys must lie within (lowest, highest; None: no bound), checked
where the section's other values are. An unset optional number (null) is not checked."""


def check_config(config: Config) -> None:
    """Raise ConfigError for the first value the program cannot use."""
    check_text_lists(config)
    for check in (_check_stages, _check_endpoints, _check_tag_provider, _check_tags, _check_guards,
                  _check_variants, _check_interrogator, _check_interpreter, _check_output, _check_dataset,
                  _check_structured):
        check(config)


def _check_ranges(section: object, where: str, kind: str) -> None:
    for key, (low, high) in RANGES[kind].items():
        value = getattr(section, key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue  # null, or `auto` where a key takes it (checked by its section)
        too_low = value <= 0 if low == ABOVE_ZERO else value < low
        if too_low or (high is not None and value > high) or math.isnan(value):
            bounds = "more than 0" if low == ABOVE_ZERO else \
                f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
            raise ConfigError(f"{where + '.' if where else ''}{key} must be {bounds} (got {value})")


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
        _check_header_text(endpoint.api_key, f"endpoints.{name}.api_key")
        if endpoint.transport not in TRANSPORTS:
            raise ConfigError(f"endpoints.{name}.transport must be {_either(TRANSPORTS)} (got {endpoint.transport!r})")
        if endpoint.structured_output not in STRUCTURED_OUTPUTS:
            raise ConfigError(f"endpoints.{name}.structured_output must be {_either(STRUCTURED_OUTPUTS)} "
                              f"(got {endpoint.structured_output!r}; none: the schema goes in the prompt only)")
        urls = [endpoint.base_url] if isinstance(endpoint.base_url, str) else endpoint.base_url
        if not isinstance(urls, list) or not urls or not all(isinstance(url, str) for url in urls):
            raise ConfigError(f"endpoints.{name}.base_url must be a URL or a list of URLs")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"endpoints.{name}.base_url must start with http:// or https:// (got {url!r})")
            problem = _url_problem(url)
            if problem:
                raise ConfigError(f"endpoints.{name}.base_url {url!r} is not a URL the client can use: {problem}")


def _url_problem(url: str) -> str:
    """Why httpx2 (which parses every URL of the run) cannot take `url`; "" when it can."""
    import httpx2  # not at import: a config error must not wait for the HTTP client's import

    try:
        parsed = httpx2.URL(url)
    except Exception as exc:  # InvalidURL, and whatever else its parser raises
        return str(exc) or type(exc).__name__
    return "" if parsed.host else "no host name"


def _check_concurrency(value: object, where: str) -> None:
    """A whole number from 1 to MAX_CONCURRENCY, or `auto`."""
    from tagcaption.slots import AUTO, MAX_CONCURRENCY

    if value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} must be a whole number or {AUTO} (got {value!r})")
    if not 1 <= value <= MAX_CONCURRENCY:
        raise ConfigError(f"{where} must be between 1 and {MAX_CONCURRENCY}, or {AUTO} (got {value})")


def _check_header_text(value: object, key: str) -> None:
    """A key or login goes into a request header, which takes printable ASCII only."""
    text = str(value or "")
    if not (text.isascii() and text.isprintable()):
        raise ConfigError(f"{key} holds a line break, a control character or a letter outside ASCII (copied with "
                          "the end of a line, or typographic quotes?): a key is printable ASCII, so copy it again")


def _check_tag_provider(config: Config) -> None:
    settings = config.tag_provider
    _check_header_text(settings.api_key, "tag_provider.api_key")
    if settings.source not in TAG_SOURCES:
        raise ConfigError(f"tag_provider.source must be {_either(TAG_SOURCES)} (got {settings.source!r})")
    _check_ranges(settings, "tag_provider", "tag_provider")
    if settings.dump_dir and settings.source != "file":
        raise ConfigError(f"tag_provider.dump_dir is set but tag_provider.source is {settings.source!r}: "
                          "set tag_provider.source: file to read the dump")


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
    if guards.faithfulness in ("False", "True"):  # YAML reads a bare `off` (or `no`, `on`) as a boolean
        guards.faithfulness = "off" if guards.faithfulness == "False" else "retry"
    if guards.faithfulness not in FAITHFULNESS_MODES:
        raise ConfigError(f"guards.faithfulness must be {_either(FAITHFULNESS_MODES)} (got {guards.faithfulness!r})")
    if guards.contradictions is not None and not guards.contradictions.strip():
        raise ConfigError("guards.contradictions must name a file of `tag: phrase, phrase` lines, or be null for none")
    for tag in config.style.omit_traits_of:
        if not str(tag).strip() or any(char in str(tag) for char in "*?[],"):
            raise ConfigError(f"style.omit_traits_of: {tag!r} is not a tag; list the tags themselves, like "
                              "[blue_hair, twintails] (no wildcards)")


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
        raise ConfigError(f"interpreter.max_tag_descriptions must be 0 or more (got {limit}; null: every summary)")
    budget = config.interpreter.tag_descriptions_tokens
    if budget is not None and (isinstance(budget, bool) or budget < 0):
        raise ConfigError(f"interpreter.tag_descriptions_tokens must be 0 or more (got {budget}; null: no budget)")


def _check_output(config: Config) -> None:
    _check_ranges(config.postprocess, "postprocess", "postprocess")
    _check_ranges(config, "", "run")
    _check_ranges(config.output, "output", "output")
    extension = config.output.extension
    if not extension.startswith(".") or len(extension) < 2:
        raise ConfigError(f"output.extension must start with a dot (got {extension!r})")
    last = "." + extension.rsplit(".", 1)[-1].lower()
    if "/" in extension or "\\" in extension or extension in (".", ".."):
        raise ConfigError(f"output.extension {extension!r} is not a file extension: use .txt or .caption")
    if last in (".jsonl", ".html"):
        raise ConfigError(f"output.extension {extension} could land on the run's own files (failures.jsonl, "
                          "captions.html): use .txt or .caption")
    if last in IMAGE_EXTENSIONS or last == ".json":
        raise ConfigError(f"output.extension {extension} would write captions over images or their .json sidecars: "
                          "use .txt or .caption")
    if config.tags_extension and extension.lower().endswith(".tags" + config.tags_extension.lower()):
        raise ConfigError(f"output.extension {extension} is where tags files are kept (<stem>.tags"
                          f"{config.tags_extension}): use .txt or .caption")
    if config.tags_extension and not config.tags_extension.startswith("."):
        raise ConfigError(f"tags_extension must start with a dot (got {config.tags_extension!r})")
    problem = check_formats(config.output.formats)
    if problem:
        raise ConfigError(problem)


def _check_structured(config: Config) -> None:
    """A response schema is read and checked now, so a bad one stops the run before any request."""
    settings = config.interpreter
    if settings.response_template and not settings.response_schema:
        raise ConfigError("interpreter.response_template writes the caption from a structured one: set "
                          "interpreter.response_schema too (see templates/structured/)")
    if not settings.response_schema:
        return
    if settings.skip:
        raise ConfigError("interpreter.response_schema asks the Interpreter for a JSON object, but interpreter.skip "
                          "is true: set interpreter.skip=false")
    from tagcaption.structured import StructuredCaption  # it reads files: only when a schema is set

    StructuredCaption.from_config(config)


# --- `--dataset` ---------------------------------------------------------------------------

DATASET_HINTS = ("tags", "full_path")
"""The hint sources that need no image file: a dataset row has none."""


def _check_dataset(config: Config) -> None:
    settings = config.dataset
    _check_ranges(settings, "dataset", "dataset")
    named = {key: getattr(settings, key) for key in ("image_column", "tags_column", "id_column", "name_column",
                                                      "caption_column", "description_column")}
    for key, value in named.items():
        if value is not None and not str(value).strip():
            raise ConfigError(f"dataset.{key} must name a column (got {value!r}); null leaves it out"
                              if key not in ("image_column", "caption_column") else
                              f"dataset.{key} must name a column (got {value!r})")
    written = {"caption_column": settings.caption_column, "description_column": settings.description_column}
    for key, value in written.items():
        read = [other for other, column in named.items() if column == value and other not in written]
        if value is not None and read:
            raise ConfigError(f"dataset.{key} {value!r} is also dataset.{read[0]}: the captions would replace "
                              "what they are made from; name another column")
    if settings.description_column is not None and settings.description_column == settings.caption_column:
        raise ConfigError(f"dataset.description_column and dataset.caption_column are both {settings.caption_column!r}")


def check_dataset_run(config: Config, images_dir: Optional[str], sample: Optional[int], shards: int) -> None:
    """What a `--dataset` run cannot be asked for: refused (exit 2) before anything is read."""
    if images_dir:
        raise ConfigError(f"give either IMAGES_DIR ({images_dir}) or --dataset, not both")
    if sample is not None and config.dataset.streaming:
        raise ConfigError("--sample picks among all the rows, which a streamed dataset does not have up front: "
                          "leave out --sample or set dataset.streaming=false")
    if config.output.report:
        raise ConfigError("output.report shows a folder's images and captions; with --dataset open the result "
                          "with load_from_disk instead (set output.report=false)")
    if config.dataset.push_to_hub and shards > 1:
        raise ConfigError("dataset.push_to_hub with --shard would push each shard over the others: join the "
                          "shards first (see docs/datasets.md), then push the joined dataset")
    interpreter = config.interpreter
    options = [config.style.extra_options] + [v.extra_options or [] for v in interpreter.prompt_variants]
    styled = not interpreter.skip and (interpreter.style or any(v.style for v in interpreter.prompt_variants))
    if config.dataset.name_column and styled and any("name" in listed for listed in options):
        raise ConfigError("dataset.name_column fills {name} per row in the Interrogator's prompts and in the "
                          "caption template, but the Interpreter's style instruction takes style.name once for "
                          "all rows: let the Interrogator use the style (interpreter.skip=true), or put {name} in "
                          "interpreter.prompt_template")
    files = [name for name in config.interrogator.hint_sources if name not in DATASET_HINTS]
    if files:
        raise ConfigError(f"interrogator.hint_sources: {', '.join(files)} read the image's files, which a dataset "
                          f"row does not have; with --dataset use {_either(DATASET_HINTS)}")
