"""The image's tags, so a vision model knows what the tagger saw."""
from __future__ import annotations

from typing import Optional

from tagcaption.tagfiles import display_tag


def hint(image) -> Optional[str]:
    if not image.tags:
        return None
    return "Tags: " + ", ".join(display_tag(tag) for tag in image.tags)
