"""Turning an image file into what a vision model is sent: a base64 data URL.

Servers ignore EXIF rotation, LM Studio cannot read WebP and large pictures cost
thousands of tokens, so every image is oriented, flattened to RGB, downscaled and
re-encoded as JPEG here. This is CPU work: call it in a thread.
"""
from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

BACKGROUND = (255, 255, 255)


class ImageError(Exception):
    """The file cannot be used as an image; str() is one line for the user."""


@dataclass(frozen=True)
class PreparedImage:
    data_url: str
    width: int
    height: int
    mime_type: str
    size_bytes: int


def prepare_image(path: Path, max_size: int = 1536, jpeg_quality: int = 90) -> PreparedImage:
    try:
        with Image.open(path) as image:
            if max_size and image.format == "JPEG":
                image.draft("RGB", (max_size, max_size))
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"not a readable image ({exc or type(exc).__name__})") from None
    if max_size and max(image.size) > max_size:
        image.thumbnail((max_size, max_size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=jpeg_quality)
    data = buffer.getvalue()
    return PreparedImage(f"data:image/jpeg;base64,{base64.b64encode(data).decode('ascii')}",
                         image.width, image.height, "image/jpeg", len(data))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, BACKGROUND)
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    return image.convert("RGB")
