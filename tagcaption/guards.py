"""Quality guards: a reply that trips one is never saved; the request is tried again.

Refusals and the script check apply where they matter: a refusal is recognised at the
start of a reply; the expected script is checked on captions only (a tag summary may
rightly quote a character's Japanese name). Each check returns a Trip naming the guard, a one-line reason, and how to try again:
a fresh attempt, a corrective follow-up turn (the bad answer and an instruction to fix
it), a fresh attempt told what the last one got wrong (`remind`), or a fresh attempt with twice
the token limit (for a reply cut off at max_tokens).
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from tagcaption.config import GuardsConfig
from tagcaption.sinks import contains_secret
from tagcaption.vocabulary import SCRIPT_PREFIXES


# Refusals are recognised at the start of a reply only, so a caption quoting a sign that
# says "I can't stop" is not one; these openers may come first.
_REFUSAL_LEAD = re.compile(r"^(?:(?:unfortunately|sadly|hmm|well|oh|apologies)[,.!]?\s+)+")
_CHAR_RUN = re.compile(r"(\S)\1{19,}")
"""Runs of one character, whole: a run is measured once, not again from each of its characters."""


@dataclass
class Trip:
    guard: str
    reason: str
    retry: str = "fresh"  # fresh | corrective | remind | more_tokens
    correction: str = ""
    fix: str = ""
    """What the user can do when the image fails on it, for the failure's one line."""


def reminded(messages: List[Dict[str, Any]], reminder: str) -> List[Dict[str, Any]]:
    """The request again with `reminder` after the text of its last user turn."""
    conversation = list(messages)
    for index in range(len(conversation) - 1, -1, -1):
        message = conversation[index]
        if message["role"] == "user":
            content = message["content"]
            content = f"{content}\n\n{reminder}" if isinstance(content, str) else \
                [*content, {"type": "text", "text": reminder}]
            conversation[index] = {**message, "content": content}
            break
    return conversation


class ReplyRejected(Exception):
    """Raised by a stage's cleaning step for a reply that cannot become its caption (JSON
    that does not follow the schema, a repeat of an earlier variant): a guard trip like the
    others, asked again the way `trip` says."""

    def __init__(self, trip: Trip):
        super().__init__(trip.reason)
        self.trip = trip


class Guards:
    def __init__(self, settings: GuardsConfig):
        self.settings = settings
        self.refusals = [phrase.lower() for phrase in settings.refusal_phrases]
        self.banned = [phrase.lower() for phrase in settings.banned_phrases]

    def check(self, text: str, finish_reason: Optional[str], final: bool) -> Optional[Trip]:
        if finish_reason == "length":
            return Trip("truncated", "reply cut off at max_tokens", "more_tokens")
        if not text.strip():
            return Trip("empty", "empty reply")
        if contains_secret(text):
            return Trip("secret", "the reply contains a configured API key (a server that echoes the request?)")
        lowered = text.lower()
        if "<think>" in lowered or "</think>" in lowered:
            return Trip("reasoning", "unfinished reasoning block in the reply")
        opening = _REFUSAL_LEAD.sub("", lowered.lstrip(" \t\n\"'“‘*"))
        refusal = next((phrase for phrase in self.refusals if opening.startswith(phrase)), None)
        if refusal:
            return Trip("refusal", f"refusal ({refusal!r})", self.settings.retry_mode,
                        "Please do the task as asked, without refusing, apologising or commenting.")
        loop = repetition(text, self.settings.repeat_limit)
        if loop:
            return Trip("repetition", f"repetition loop ({loop!r} over and over)")
        if final and self.banned:
            found = [phrase for phrase in self.banned if phrase in lowered]
            if found:
                return Trip("banned_phrase", f"banned phrase {found[0]!r}", self.settings.retry_mode,
                            self.settings.banned_correction.replace("{phrases}", ", ".join(found)))
        share = other_script_share(text, self.settings.expected_script) if final else 0.0
        if share > self.settings.max_other_script:
            return Trip("wrong_script", f"{share:.0%} of the letters are not {self.settings.expected_script}",
                        self.settings.retry_mode,
                        f"Please answer again, written only in {self.settings.expected_script} script.")
        return None


def repetition(text: str, limit: int) -> Optional[str]:
    """A run of one character, or a short phrase (1-8 words) repeated `limit` times in a row:
    for each phrase length, `size * (limit - 1)` words in a row each equal to the word
    `size` on (one pass per length, whatever `limit` is)."""
    longest = max(limit * 4, 20)
    char_run = next((run for run in _CHAR_RUN.finditer(text) if run.end() - run.start() >= longest), None)
    if char_run:
        return char_run.group(1) * 3
    words = text.lower().split()
    for size in range(1, 9):
        needed, run = size * (limit - 1), 0
        for index in range(len(words) - size):
            run = run + 1 if words[index] == words[index + size] else 0
            if run == needed:
                start = index - needed + 1
                return " ".join(words[start:start + size])
    return None


def other_script_share(text: str, expected: str) -> float:
    """The share of letters outside the expected script (0 when `expected` is `any`)."""
    prefixes = SCRIPT_PREFIXES.get(expected)
    if not prefixes:
        return 0.0
    letters = [char for char in text if char.isalpha()]
    if not letters:
        return 0.0
    other = sum(1 for char in letters if not unicodedata.name(char, "").startswith(prefixes))
    return other / len(letters)
