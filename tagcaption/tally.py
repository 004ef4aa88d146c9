"""Every count of a run, in one place: what was done, by which stage, at what cost.

Each part of the program counts through `Tally.update(key, n)` — as datatrove counts
through `stat_update` — and nothing else keeps a count of its own: the summary, the
progress bars and the exit code all read this one tally. Keys are dotted names:

- `images.captioned`, `.skipped`, `.failed`, `.backups`, `.shrunk`, `.pending` (found
  needing a caption), `.walked` (every image the walk passed), `.selected` (the count of
  names, once known), `.flagged` (kept with faithfulness findings, `guards.faithfulness: warn`),
  `.names_unchecked` (a prompt carried names, but the tags' categories were unknown)
- `tags.found` (distinct tags of the run), `.resolved`, `.summarised`, `.resummarised`,
  `.cached`, `.no_wiki`, `.excluded`, `.refused`, `.lookup_failed`, `.failed`, `.aliased`
- `danbooru.requests`
- `requests.<stage>`, `retries.<stage>`, `prompt_tokens.<stage>`, `completion_tokens.<stage>`,
  and where the server reports them `image_tokens.<stage>` and `cached_tokens.<stage>` (parts
  of the prompt tokens)
- `guards.<guard>`: replies asked again because they tripped that guard

`notes` keeps the few facts that are text rather than numbers (why Danbooru was given up).
Listeners (the progress display) hear every update as it happens.
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, List

Listener = Callable[[str, int], None]


class Tally:
    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.notes: Dict[str, str] = {}
        self._listeners: List[Listener] = []

    def update(self, key: str, n: int = 1) -> None:
        self.counts[key] += n
        for listener in self._listeners:
            listener(key, n)

    def set(self, key: str, value: int) -> None:
        self.update(key, value - self.counts[key])

    def note(self, key: str, text: str) -> None:
        """Keep the first text given for `key`."""
        self.notes.setdefault(key, text)

    def __getitem__(self, key: str) -> int:
        return self.counts[key]

    def group(self, prefix: str) -> Dict[str, int]:
        """`{"refusal": 2, …}` for the keys `guards.refusal`, … that were counted."""
        start = prefix + "."
        return {key[len(start):]: value for key, value in self.counts.items() if key.startswith(start) and value}

    def listen(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def unlisten(self, listener: Listener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)
