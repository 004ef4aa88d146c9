"""Progress that fits where it is shown, fed by the tally's events: nothing here reaches
into a stage.

On a terminal: stacked bars that never overwrite each other — the run's distinct tags as
they are resolved, every image the run is asked for (skipped and failed ones done as they
are found), and a line with the rate, the requests in flight and the time left. When
stderr is not a terminal (nohup, Slurm, a container's log): no bars, and instead one plain
line every PLAIN_SECONDS or every PLAIN_STEP of the images, whichever comes first:
`images 1200/20000 (6%), 3.1/s, eta 1h41m, failed 2`. `--no-progress` hides both.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable, Optional

from tqdm import tqdm

from tagcaption.tally import Tally

log = logging.getLogger("caption")

DONE = ("images.captioned", "images.failed", "images.skipped", "images.rejected")
WALKED = ("images.pending", "images.skipped", "images.rejected")
PLAIN_SECONDS = 30.0
PLAIN_STEP = 0.05


def duration(seconds: float) -> str:
    """`1h41m`, `3m05s`, `12s`."""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    def __init__(self, tally: Tally, show: Optional[bool], tags: bool, in_flight: Callable[[], int] = lambda: 0):
        """`show`: False hides everything; None shows bars on a terminal and plain lines elsewhere."""
        self.tally, self.in_flight = tally, in_flight
        self.started = time.monotonic()
        self.bars = show is not False and (show is True or _is_terminal())
        self.plain = show is None and not self.bars
        self._last_line, self._last_share = self.started, 0.0
        self.tag_bar = self.image_bar = self.status = None
        if self.bars:
            position = 0
            if tags:
                self.tag_bar = tqdm(total=0, desc="tags", unit="tag", position=0, leave=True, dynamic_ncols=True)
                position = 1
            self.image_bar = tqdm(total=self._total(), initial=self._done(), desc="images", unit="img",
                                  position=position, leave=True, dynamic_ncols=True)
            self.status = tqdm(total=0, position=position + 1, bar_format="{desc}", leave=False, dynamic_ncols=True)
        tally.listen(self._heard)

    def _total(self) -> int:
        return max(self.tally["images.selected"], sum(self.tally[key] for key in WALKED))

    def _done(self) -> int:
        return sum(self.tally[key] for key in DONE)

    def _heard(self, key: str, n: int) -> None:
        if key == "tags.found" and self.tag_bar is not None:
            self.tag_bar.total += n
            self.tag_bar.refresh()
        elif key == "tags.resolved" and self.tag_bar is not None:
            self.tag_bar.update(n)
        if (key in WALKED or key == "images.selected") and self.image_bar is not None:
            self.image_bar.total = self._total()  # drawn with the next update
        if key in DONE:
            if self.image_bar is not None:
                self.image_bar.update(n)
                self.status.set_description_str(self._status(), refresh=True)
            elif self.plain:
                self._maybe_line()

    def _rate_and_eta(self):
        done, total = self._done(), self._total()
        captioned = self.tally["images.captioned"] + self.tally["images.failed"]
        rate = captioned / max(time.monotonic() - self.started, 1e-6)
        eta = duration((total - done) / rate) if rate > 0 and total > done else "-"
        return done, total, rate, eta

    def _status(self) -> str:
        _, _, rate, eta = self._rate_and_eta()
        return f"{rate:.1f} img/s, {self.in_flight()} requests in flight, eta {eta}"

    def _maybe_line(self) -> None:
        done, total, rate, eta = self._rate_and_eta()
        share = done / total if total else 0.0
        now = time.monotonic()
        if now - self._last_line < PLAIN_SECONDS and share - self._last_share < PLAIN_STEP and done < total:
            return
        self._last_line, self._last_share = now, share
        failed = self.tally["images.failed"] + self.tally["images.rejected"]
        log.info(f"images {done}/{total} ({share:.0%}), {rate:.1f}/s, eta {eta}, failed {failed}")

    def close(self) -> None:
        self.tally.unlisten(self._heard)
        for bar in (self.status, self.tag_bar, self.image_bar):
            if bar is not None:
                bar.close()


def _is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False
