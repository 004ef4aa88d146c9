"""Progress bars, fed by the tally's events: nothing here reaches into a stage.

The tag bar counts the run's distinct tags as they are resolved; the image bar counts
every image the run is asked for (skipped and failed ones done as they are found), its
total the count of names once known, or as far as the walk has gone.
"""
from __future__ import annotations

from typing import Optional

from tqdm import tqdm

from tagcaption.tally import Tally

DONE = ("images.captioned", "images.failed", "images.skipped", "images.rejected")
WALKED = ("images.pending", "images.skipped", "images.rejected")


class Progress:
    def __init__(self, tally: Tally, show: Optional[bool], tags: bool):
        self.tally = tally
        disable = show is False
        self.tag_bar = tqdm(total=0, desc="tags", unit="tag", disable=disable, position=0, leave=True,
                            dynamic_ncols=True) if tags else None
        self.image_bar = tqdm(total=self._total(), initial=self._done(), desc="images", unit="img",
                              disable=disable, position=1 if tags else 0, leave=True, dynamic_ncols=True)
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
            return
        if key in WALKED or key == "images.selected":
            self.image_bar.total = self._total()  # drawn with the next update
        if key in DONE:
            self.image_bar.update(n)

    def close(self) -> None:
        self.tally.unlisten(self._heard)
        for bar in (self.tag_bar, self.image_bar):
            if bar is not None:
                bar.close()
