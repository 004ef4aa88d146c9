"""How many requests a server runs at once, where it says so (`concurrency: auto`).

- llama.cpp's `llama-server` answers `GET /props` (beside `/v1`, not under it) with
  `total_slots`, its `-np`.
- vLLM lists its models with `owned_by: "vllm"` but does not report `--max-num-seqs` (only
  its development-mode `/server_info` does); it batches continuously, so a high number
  keeps it busy: VLLM_CONCURRENCY.
- LM Studio ("Max Concurrent Predictions", 4 by default) and Ollama (`OLLAMA_NUM_PARALLEL`)
  do not expose theirs; cloud APIs have rate limits rather than slots: DEFAULT_CONCURRENCY.

With a known number of slots, `auto` keeps one request in eight (at least one) waiting
at the server, which starts it the moment a slot frees (see the README's Speed section).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

import httpx2

from tagcaption.wire import get_small

AUTO = "auto"
DEFAULT_CONCURRENCY = 4
VLLM_CONCURRENCY = 64
MAX_CONCURRENCY = 1024
PROBE_SECONDS = 5.0


@dataclass(frozen=True)
class Slots:
    """What a server said about its parallel slots."""
    count: Optional[int]
    """The slots it reported; None when it does not say."""
    server: str
    """Which server that was, as far as it can be told (`llama.cpp`, `vLLM`, or "")."""

    @property
    def concurrency(self) -> int:
        """The concurrency `auto` chooses for this server."""
        if self.count:
            return min(MAX_CONCURRENCY, self.count + max(1, self.count // 8))
        return VLLM_CONCURRENCY if self.server == "vLLM" else DEFAULT_CONCURRENCY

    def describe(self) -> str:
        if self.count:
            return f"{self.count} ({self.server} /props total_slots)"
        if self.server == "vLLM":
            return f"not reported (vLLM: auto uses {VLLM_CONCURRENCY})"
        return f"not reported (auto uses {DEFAULT_CONCURRENCY})"


def server_root(base_url: str) -> str:
    """`http://host:8080/v1` → `http://host:8080`: llama.cpp's `/props` is not under `/v1`."""
    base = base_url.rstrip("/")
    return base[: -len("/v1")] if base.endswith("/v1") else base


async def probe_slots(http: httpx2.AsyncClient, base_url: str, headers: Dict[str, str],
                      owners: Iterable[str] = ()) -> Slots:
    """The server's slots: `/props` if it answers with `total_slots`, else what the model
    list's owners tell. Never raises: a server that says nothing gets the defaults."""
    total = None
    try:
        response = await get_small(http, f"{server_root(base_url)}/props", headers, PROBE_SECONDS)
        if response.status_code == 200:
            total = _total_slots(response.json())
    except (httpx2.HTTPError, ValueError):
        pass
    if total:
        return Slots(total, "llama.cpp")
    return Slots(None, "vLLM" if "vllm" in {str(owner).lower() for owner in owners} else "")


def _total_slots(props: Any) -> Optional[int]:
    value = props.get("total_slots") if isinstance(props, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def advice(name: str, configured: object, limit: int, slots: Slots) -> Optional[str]:
    """A warning when the endpoint would send a server fewer requests than it runs at once."""
    if not slots.count or limit >= slots.count:
        return None
    return (f"warning: endpoints.{name}.concurrency is {configured}, but the server runs {slots.count} requests at "
            f"once: {slots.count - limit} of its slots would stay idle (set it to {slots.concurrency}, or {AUTO})")


def table_cell(configured: object, limit: int, slots: Optional[Slots]) -> str:
    """`slots/concurrency` for `check`'s table: `4/5`, `?/4`, `4/auto=5`."""
    shown = f"{AUTO}={limit}" if configured == AUTO else str(limit)
    return f"{slots.count if slots and slots.count else '?'}/{shown}"
