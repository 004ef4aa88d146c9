"""The names the program shares with its users and with Danbooru, each written once.

Config values, `failures.jsonl` and `captions.jsonl` fields, tag categories and ratings
are spelled the same everywhere; every module takes them from here. This module imports
nothing of the program, so anything may import it.
"""
from __future__ import annotations

from typing import Dict, Tuple

# --- stages ------------------------------------------------------------------------------

TAG_PROVIDER = "tag_provider"
INTERROGATOR = "interrogator"
INTERPRETER = "interpreter"
STAGES = (TAG_PROVIDER, INTERROGATOR, INTERPRETER)
"""In the order an image goes through them; also their config sections' names."""
PROMPTED_STAGES = (INTERROGATOR, INTERPRETER)
"""The stages that take a style or `prompt_variants`."""

# --- tags ----------------------------------------------------------------------------------

DANBOORU_CATEGORIES: Dict[int, str] = {0: "general", 1: "artist", 3: "copyright", 4: "character", 5: "meta"}
"""Danbooru's category numbers (`tag.category` in its API and dumps)."""
GENERAL = "general"
CATEGORIES = ("general", "character", "copyright", "artist", "meta")
"""In the order a prompt lists them (`{general_tags}`, `{character_tags}`…) and a sidecar is read."""
RATINGS: Dict[str, str] = {"g": "general", "s": "sensitive", "q": "questionable", "e": "explicit"}
"""Danbooru's one-letter ratings, as they read in a prompt."""

TAG_SOURCES = ("danbooru", "file", "none")
"""`tag_provider.source`: where tag wiki pages come from."""
TAG_INPUTS = ("txt", "sidecar")
"""`tags.sources`: where an image's own tags are read from."""
TAG_COMBINE = ("first", "all")

# --- images and outputs --------------------------------------------------------------------

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                              ".avif", ".heic", ".heif"})
IMAGE_FORMATS = ("auto", "jpeg", "png", "original")
"""`interrogator.image_format`: how an image is sent to the vision model."""

TXT = "txt"
OUTPUT_FORMATS = (TXT, "jsonl", "metadata")
"""`output.formats`; `txt`, the per-image caption files, is always among them."""

CAPTION = "caption"
TAGS_THEN_CAPTION = "tags_then_caption"
STYLE_OUTPUTS = (CAPTION, TAGS_THEN_CAPTION)
"""A style's `output:` line: the model's text alone, or after the image's tags."""
STRUCTURED_SUFFIX = ".caption.json"
"""`<stem>.caption.json`: a structured caption's object, beside its text caption."""
MAX_VARIANTS = 20
"""`output.variants` at most: past a handful a model only rephrases what it already wrote."""

# --- guards --------------------------------------------------------------------------------

SCRIPT_PREFIXES: Dict[str, Tuple[str, ...]] = {
    "latin": ("LATIN",), "cyrillic": ("CYRILLIC",), "greek": ("GREEK",),
    "cjk": ("CJK", "HIRAGANA", "KATAKANA", "HANGUL"), "arabic": ("ARABIC",), "hebrew": ("HEBREW",)}
"""`guards.expected_script`, and how Unicode names the letters of each script."""
ANY_SCRIPT = "any"
SCRIPTS = (ANY_SCRIPT,) + tuple(SCRIPT_PREFIXES)
RETRY_MODES = ("fresh", "corrective")
FAITHFULNESS = "faithfulness"
"""The guard that holds a caption to its image's tags (faithfulness.py)."""
FAITHFULNESS_MODES = ("retry", "warn", "off")
"""`guards.faithfulness`: ask again (then fail the image), keep the caption flagged, or no check."""
TOKEN_LIMIT_PARAMS = ("max_tokens", "max_completion_tokens")
TRANSPORTS = ("auto", "httpx")
JSON_SCHEMA = "json_schema"
STRUCTURED_OUTPUTS = (JSON_SCHEMA, "none")
"""`endpoints.<name>.structured_output`: a response schema sent as response_format, or in the prompt only."""
