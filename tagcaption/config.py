"""The configuration schema, and loading it from YAML plus command-line overrides.

The key names here are a public interface: users' config files and scripts rely on
them, so new keys may be added but existing ones are never renamed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tagcaption import DATA_DIR
from tagcaption.config_checks import check_config
from tagcaption.config_errors import check_keys, in_user_words, yaml_problem
from tagcaption.errors import ConfigError
from tagcaption.remember import recall
from tagcaption.sinks import register_secret

DEFAULT_CONFIG = DATA_DIR / "config.yaml"


@dataclass
class EndpointConfig:
    base_url: Any = "http://localhost:1234/v1"
    """One URL, or a list of replicas of the same model."""
    api_key: str = ""
    concurrency: Any = 4
    """Requests in flight per replica: a number, or `auto` (the server's slots, see slots.py)."""
    timeout: float = 300.0
    request_timeout: float = 600.0
    """Seconds for a whole reply, stream included, from when the request leaves."""
    max_reply_bytes: int = 1048576
    max_retries: int = 3
    retry_backoff: float = 1.0
    retry_max_backoff: float = 60.0
    down_after: float = 120.0
    stop_after_failures: int = 3
    """Connection attempts in a row that reach no replica before the run stops."""
    auto_concurrency: bool = field(default=False, metadata={"internal": True})
    """`concurrency` was `auto`: the endpoint has put the number it chose there (see endpoint.py)."""
    rest_after: int = 3
    rest_seconds: float = 30.0
    stream: bool = True
    stream_usage: bool = True
    token_limit_param: str = "max_tokens"
    transport: str = "auto"
    """`auto`: chat requests to an `http://` server without a proxy go through http1.py; `httpx`: all through httpx2."""
    structured_output: str = "json_schema"
    """How a response schema is sent: json_schema (OpenAI's response_format) or none (in the prompt only)."""


@dataclass
class StageConfig:
    skip: bool = False
    endpoint: str = "default"
    model: str = "local-model"
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    max_tokens: int = 512
    seed: Optional[int] = None
    frequency_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    extra_body: Dict[str, Any] = field(default_factory=dict)


@dataclass
class VariantConfig:
    """One of several ways to prompt a stage, picked per image (deterministically) by weight."""
    weight: float = 1.0
    style: Optional[str] = None
    length: Optional[str] = None
    word_count: Optional[int] = None
    extra_options: Optional[List[str]] = None
    prompts: Optional[List[str]] = None
    prompt_template: Optional[str] = None


@dataclass
class TagProviderConfig(StageConfig):
    source: str = "danbooru"
    danbooru_url: str = "https://danbooru.donmai.us"
    login: str = ""
    api_key: str = ""
    danbooru_rate: float = 2.0
    danbooru_batch_size: int = 100
    danbooru_concurrency: int = 2
    danbooru_timeout: float = 30.0
    danbooru_retries: int = 3
    wiki_dump: Optional[str] = None
    tags_dump: Optional[str] = None
    dump_dir: Optional[str] = None
    """A folder of Danbooru's tables as downloaded (wiki_pages, tags, tag_aliases, tag_implications)."""
    outage_minutes: float = 10.0
    """A Danbooru that did not answer is not asked again for this long (in later runs too)."""
    cache_file: str = "tags_cache.json"
    negative_ttl_days: float = 30.0
    system_prompt: str = ""
    prompt_template: str = "templates/tag_summary.txt"
    wiki_max_chars: int = 1500
    min_post_count: int = 0
    max_tokens: int = 120


@dataclass
class TagsConfig:
    sources: List[str] = field(default_factory=lambda: ["txt", "sidecar"])
    combine: str = "first"
    exclude: List[str] = field(default_factory=list)
    exclude_categories: List[str] = field(default_factory=lambda: ["meta"])
    resolve_aliases: bool = True
    """An aliased tag (`kitty`) reaches summaries and prompts as its target (`cat`)."""
    prune_implied: bool = True
    """A tag implied by a more specific one of the image (`long_hair` by `very_long_hair`) is left
    out of the prompt's tag variables (not out of `{booru_tags}`)."""


@dataclass
class InterrogatorConfig(StageConfig):
    skip: bool = True
    system_prompt: str = ""
    prompts: List[str] = field(default_factory=lambda: ["Describe this image in detail."])
    hint_sources: List[str] = field(default_factory=list)
    global_metadata_file: Optional[str] = None
    style: Optional[str] = None
    prompt_variants: List[VariantConfig] = field(default_factory=list)
    max_image_size: int = 1536
    image_format: str = "auto"
    jpeg_quality: int = 90
    background: str = "#ffffff"


@dataclass
class InterpreterConfig(StageConfig):
    system_prompt: str = ""
    prompt_template: str = "auto"
    style: Optional[str] = None
    prompt_variants: List[VariantConfig] = field(default_factory=list)
    max_tag_descriptions: Optional[int] = 30
    """Tag summaries in `{tag_descriptions}` at most, the rarest tags kept (None: all)."""
    tag_descriptions_tokens: Optional[int] = 800
    """The prompt tokens `{tag_descriptions}` may take, at 4 characters a token (None: no budget)."""
    response_schema: Optional[str] = None
    """A JSON Schema file: the caption is asked as a JSON object (structured.py), kept as <stem>.caption.json."""
    response_template: Optional[str] = None


@dataclass
class StyleConfig:
    name: str = ""
    length: str = "any"
    word_count: Optional[int] = None
    extra_options: List[str] = field(default_factory=list)
    omit_traits_of: List[str] = field(default_factory=list)
    """Tags the trigger word stands for: out of the prompt's tags, in `{omit}`, absent from captions."""


@dataclass
class PostprocessConfig:
    strip_preamble: bool = True
    strip_label: bool = True
    strip_markdown: bool = True
    strip_quotes: bool = True
    strip_image_shows: bool = False
    collapse_whitespace: bool = True
    max_words: Optional[int] = None
    prefix: str = ""
    suffix: str = ""


REFUSALS = ["i'm sorry", "i am sorry", "sorry, i", "i cannot", "i can't", "i can not", "i'm unable", "i am unable",
            "i'm not able", "i am not able", "i won't", "i will not", "i'm afraid i", "as an ai", "as a language model",
            "as an assistant", "i apologize", "i don't have the ability", "i do not have the ability",
            "please provide the image", "please provide an image", "please upload", "i don't see an image",
            "i do not see an image", "no image was provided", "there is no image", "i'm not comfortable",
            "i am not comfortable"]


@dataclass
class GuardsConfig:
    max_attempts: int = 3
    retry_mode: str = "corrective"
    refusal_phrases: List[str] = field(default_factory=lambda: list(REFUSALS))
    banned_phrases: List[str] = field(default_factory=list)
    banned_correction: str = "Rewrite your answer without these phrases: {phrases}. Answer with the new text only."
    repeat_limit: int = 6
    expected_script: str = "latin"
    max_other_script: float = 0.1
    faithfulness: str = "retry"
    contradictions: Optional[str] = "templates/contradictions.txt"
    """The table of opposites (`smile: frowning, frown`); null: none."""


@dataclass
class OutputConfig:
    extension: str = ".txt"
    dir: Optional[str] = None
    overwrite: bool = False
    formats: List[str] = field(default_factory=lambda: ["txt"])
    report: bool = False
    variants: int = 1


@dataclass
class DatasetConfig:
    """`--dataset`: which columns of a Hugging Face dataset's rows are read and written, and
    where the captioned dataset goes (hf_dataset.py reads it, hf_output.py writes it)."""
    image_column: str = "image"
    tags_column: Optional[str] = None
    id_column: Optional[str] = None
    """None: the row's index in the split."""
    name_column: Optional[str] = None
    caption_column: str = "caption"
    description_column: Optional[str] = "description"
    output_path: Optional[str] = None
    """None: `<dataset name>-captioned` (with `-K-of-N` under --shard) in the current folder."""
    save_interval: int = 1000
    split: Optional[str] = None
    """None: `train`, or the dataset's only split."""
    config_name: Optional[str] = None
    revision: Optional[str] = None
    streaming: bool = False
    push_to_hub: Optional[str] = None


@dataclass
class Config:
    images_dir: Optional[str] = None
    recursive: bool = False
    tags_extension: Optional[str] = ".txt"
    tags: TagsConfig = field(default_factory=TagsConfig)
    endpoints: Dict[str, EndpointConfig] = field(default_factory=lambda: {"default": EndpointConfig()})
    tag_provider: TagProviderConfig = field(default_factory=TagProviderConfig)
    interrogator: InterrogatorConfig = field(default_factory=InterrogatorConfig)
    interpreter: InterpreterConfig = field(default_factory=InterpreterConfig)
    style: StyleConfig = field(default_factory=StyleConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    stop_grace: float = 5.0
    """Seconds the images in flight get after Ctrl-C or SIGTERM."""
    file_timeout: float = 30.0
    """Seconds a file read may take before its image fails (a stalled share, a FIFO)."""
    config_dir: str = field(default=".", metadata={"internal": True})

    def path(self, value: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return (Path(self.config_dir) / os.path.expanduser(value)).resolve()

    def resource(self, value: str) -> Path:
        """A template or data file: next to the config, else shipped with the program."""
        local = self.path(value)
        if local.exists() or Path(value).is_absolute():
            return local
        shipped = (DATA_DIR / value).resolve()
        return shipped if shipped.exists() else local


def load_config(config_file: Optional[str] = None, overrides: List[str] = (),
                images_dir: Optional[str] = None) -> Config:
    """Read, merge, validate and resolve the configuration.

    Raises ConfigError with a one-line message naming the offending key.
    """
    path = Path(config_file) if config_file else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        user = OmegaConf.load(path)
    except Exception as exc:
        raise ConfigError(f"cannot read config file {path}: {yaml_problem(exc)}") from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not KEY=VALUE (for example interpreter.model=mistral-7b)")
    cli = OmegaConf.create()
    for item in overrides:
        try:
            cli = OmegaConf.merge(cli, OmegaConf.from_dotlist([item]))
        except Exception as exc:  # YAML's or OmegaConf's own parser: either way the same one line
            problem = getattr(exc, "problem", None) or yaml_problem(exc)
            raise ConfigError(f"cannot read the override {item}: {problem} (lists are written "
                              "[a,b], text with spaces, commas or a * in quotes: 'tags.exclude=[\"*_hair\"]')") from None
    _paths_from_here(cli)

    for source in (user, cli):
        raw = OmegaConf.to_container(source, resolve=False) if source is not None else {}
        _register_raw_keys(raw)
        check_keys(raw, Config, "")

    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), user, cli)
        _register_keys(merged)
        merged.config_dir = str(path.resolve().parent)
        config: Config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(in_user_words(exc, Config)) from None

    if images_dir is not None:
        config.images_dir = str(Path(images_dir).resolve())
    elif config.images_dir:
        config.images_dir = str(config.path(config.images_dir))
    given = _dotted(cli) | (_dotted(user) if config_file else set()) | ({"images_dir"} if images_dir else set())
    recall(config, given)
    check_config(config)
    return config


CLI_PATHS = ("images_dir", "output.dir", "tag_provider.cache_file", "tag_provider.wiki_dump",
             "tag_provider.tags_dump", "tag_provider.dump_dir", "dataset.output_path")
CLI_RESOURCES = ("interpreter.prompt_template", "tag_provider.prompt_template", "interrogator.global_metadata_file",
                 "interpreter.response_schema", "interpreter.response_template", "guards.contradictions")


def _paths_from_here(cli) -> None:
    """A relative path given on the command line is relative to where the command runs (one
    in a config file, to the file's folder). Templates and metadata files not found here are
    still looked up beside the config and in the program's folder (config.resource)."""
    for key in CLI_PATHS + CLI_RESOURCES:
        value = OmegaConf.select(cli, key, default=None)
        if not isinstance(value, str) or not value or value == "auto" or os.path.isabs(os.path.expanduser(value)):
            continue
        here = Path.cwd() / os.path.expanduser(value)
        if key in CLI_PATHS or here.exists():
            OmegaConf.update(cli, key, str(here.resolve()), merge=False)


def _register_keys(merged) -> None:
    """Every API key is a secret from the moment it is read, so that no message — a config
    error quoting a key interpolated elsewhere included — can show it."""
    sections = [f"endpoints.{name}" for name in (OmegaConf.select(merged, "endpoints") or {})] + ["tag_provider"]
    for section in sections:
        try:
            register_secret(OmegaConf.select(merged, f"{section}.api_key", default=None),
                            login=str(OmegaConf.select(merged, f"{section}.login", default="") or ""))
        except OmegaConfBaseException:  # an interpolation that does not resolve: reported below
            continue


def _register_raw_keys(raw: object) -> None:
    """API keys written as they are (not `${oc.env:…}`), known before anything is checked."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            if key == "api_key":
                _register_all(value)
            else:
                _register_raw_keys(value)


def _register_all(value: object) -> None:
    """A key as written, and every text inside one given as a mapping or list by mistake."""
    if isinstance(value, str):
        if "${" not in value:
            register_secret(value)
    elif isinstance(value, dict):
        for sub in value.values():
            _register_all(sub)
    elif isinstance(value, list):
        for sub in value:
            _register_all(sub)


def _dotted(source) -> set:
    """The dotted keys a config source sets (`output.dir`, `endpoints.default.api_key`…)."""
    keys: set = set()

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(sub, f"{prefix}{key}.")
        elif prefix:
            keys.add(prefix.rstrip("."))
    if source is not None:
        walk(OmegaConf.to_container(source, resolve=False), "")
    return keys
