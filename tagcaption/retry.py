"""The one retry policy of every client: the LLM endpoints and Danbooru.

Which failures are worth another try is decided here, once: a status of 408, 409, 429 or
5xx, a timeout, a connection that failed, and the reply faults that a fresh request can
cure (a stream cut mid-way, malformed JSON, no choices). Any other 4xx, or an answer that
would be the same every time (no vision, context overflow), is not.

How long to wait follows openai-python: exponential backoff with jitter, unless the server
said how long with `retry-after-ms` or `Retry-After` (seconds or an HTTP date), which wins
but is capped so that a confused server cannot park a run for an hour.
"""
from __future__ import annotations

import email.utils
import math
import random
import time
from dataclasses import dataclass
from datetime import timezone
from typing import Callable, Mapping, Optional

from tagcaption.errors import Kind

RETRYABLE_STATUSES = frozenset({408, 409, 429})
"""Besides every status >= 500."""

RETRYABLE_KINDS = frozenset({Kind.CONNECTION, Kind.TIMEOUT, Kind.MALFORMED_REPLY, Kind.REPLY_ERROR,
                             Kind.STREAM_ERROR, Kind.STREAM_CUT, Kind.EMPTY_CHOICES})
"""Failures without a status that another request may not repeat."""


def retryable_status(status: int) -> bool:
    return status in RETRYABLE_STATUSES or status >= 500


def is_retryable(kind: Kind, status: Optional[int] = None) -> bool:
    """Whether a failure of `kind` (with its HTTP `status` for `Kind.HTTP`) may pass on a retry."""
    if kind is Kind.HTTP:
        return status is not None and retryable_status(status)
    return kind in RETRYABLE_KINDS


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int
    """Retries after the first attempt: `max_retries + 1` attempts in all."""
    backoff: float
    """Seconds of the first wait's ceiling; it doubles with each attempt."""
    max_backoff: float
    max_retry_after: float = 120.0

    def should_retry(self, attempt: int, retryable: bool) -> bool:
        """After failed attempt number `attempt` (1-based), whether to try again."""
        return retryable and attempt <= self.max_retries

    def delay(self, attempt: int, retry_after: Optional[float] = None,
              rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        ceiling = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return ceiling * (0.5 + 0.5 * rand())


def parse_retry_after(headers: Mapping[str, str], now: Optional[float] = None) -> Optional[float]:
    """Seconds the server asked to wait, from `retry-after-ms` or `Retry-After` (seconds or
    an HTTP date, measured from `now`, a Unix time); None when absent or unreadable. Not
    capped here: a date in the past gives a negative number, `RetryPolicy.delay` floors it."""
    lowered = {str(name).lower(): value for name, value in headers.items()}
    milliseconds = _seconds(lowered.get("retry-after-ms"))
    if milliseconds is not None:
        return milliseconds / 1000
    value = lowered.get("retry-after")
    if value is None:
        return None
    seconds = _seconds(value)
    if seconds is not None:
        return seconds
    try:
        moment = email.utils.parsedate_to_datetime(str(value))
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)  # "-0000": UTC, with no claim about the sender's zone
    return moment.timestamp() - (time.time() if now is None else now)


def _seconds(value: Optional[str]) -> Optional[float]:
    try:
        seconds = float(value) if value is not None else None
    except ValueError:
        return None
    return seconds if seconds is not None and math.isfinite(seconds) else None
