"""Where text leaves the program — the terminal and every file written — and the one step
that removes secrets on the way.

Every configured API key is registered here when the config is read. `redact` replaces
each, in every form it can take on the way out (as given, JSON-escaped, URL-encoded, and
Danbooru's `login:api_key` as HTTP basic auth's base64), with `***`. Messages, the
summary, `failures.jsonl`, debug files and the review page all pass through it.

A message cut short is cut by `shorten`, which redacts first: a key cut in half is no longer
a form `redact` knows, and would leave the program as the piece the cut kept.
"""
from __future__ import annotations

import base64
import json
import sys
import threading
from typing import IO, Iterable, Optional, Set
from urllib.parse import quote, quote_plus

REDACTED = "***"
MIN_SECRET = 8
"""Characters; shorter values ("none", "ollama", "EMPTY") would redact ordinary words, and a
caption saying "none of it" would trip the secret guard."""
PLACEHOLDER_KEYS = frozenset({"no-key", "nokey", "not-needed", "lm-studio", "lmstudio", "sk-no-key-required",
                              "token-abc123", "your-api-key", "sk-dummy", "dummy-key", "local-key"})
"""Keys local servers take in place of one (their docs' examples): nothing to keep secret."""

_forms: Set[str] = set()
_lock = threading.Lock()


def register_secret(value: object, login: str = "") -> None:
    """Remember a key (and, with `login`, its basic-auth form) so that no sink shows it."""
    if not isinstance(value, str) or len(value) < MIN_SECRET or value.lower() in PLACEHOLDER_KEYS:
        return
    forms = {value, json.dumps(value)[1:-1], quote(value, safe=""), quote_plus(value)}
    if login:
        forms.add(base64.b64encode(f"{login}:{value}".encode()).decode())
    with _lock:
        _forms.update(form for form in forms if len(form) >= MIN_SECRET)


def register_secrets(values: Iterable[object]) -> None:
    for value in values:
        register_secret(value)


def redact(text: str) -> str:
    """`text` with every registered secret replaced by `***`, longest forms first."""
    if not _forms or not text:
        return text
    for form in sorted(_forms, key=len, reverse=True):
        if form in text:
            text = text.replace(form, REDACTED)
    return text


def shorten(text: object, limit: int) -> str:
    """`text` redacted, then cut to at most `limit` characters (the last one an ellipsis)."""
    text = redact(str(text))
    return text if len(text) <= limit else text[:max(limit - 1, 0)] + "…"


def contains_secret(text: str) -> bool:
    return any(form in text for form in _forms)


def say(text: str, stream: Optional[IO[str]] = None) -> None:
    """Print a line for the user, redacted; a closed stdout or stderr (a pipe to `head` that
    ended) is no reason for a traceback."""
    stream = stream or sys.stdout
    if stream is None:  # started with the descriptor closed (`>&-`)
        return
    try:
        print(redact(text), file=stream, flush=True)
    except (BrokenPipeError, ValueError, OSError):
        pass
