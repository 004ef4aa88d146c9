"""Turning an image file into what a vision model is sent: a base64 data URL.

Servers ignore EXIF rotation, LM Studio cannot read WebP and large pictures cost
thousands of tokens, so every image is oriented, flattened to RGB, downscaled and
re-encoded as JPEG here. This is CPU work: call it in a thread.
"""
from __future__ import annotations

import base64
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

BACKGROUND = (255, 255, 255)

# Pillow only warns between MAX_IMAGE_PIXELS and twice that; a picture that big is refused.
warnings.simplefilter("error", Image.DecompressionBombWarning)


class ImageError(Exception):
    """The file cannot be used as an image; str() is one line for the user."""


@dataclass(frozen=True)
class PreparedImage:
    data_url: str
    width: int
    height: int
    mime_type: str
    size_bytes: int


def check_image(path: Path) -> None:
    """Fail on a file a trainer could not read either: decoded whole (JPEGs at reduced
    scale, which is cheap), so a truncated file is caught too."""
    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(_unreadable(exc)) from None


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown format or damaged file)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read the file ({exc.strerror})"
    return f"not a readable image ({exc or type(exc).__name__})"


def prepare_image(path: Path, max_size: int = 1536, jpeg_quality: int = 90) -> PreparedImage:
    try:
        with Image.open(path) as image:
            if max_size and image.format == "JPEG":
                image.draft("RGB", (max_size, max_size))
            image.seek(0)
            image.load()
            image = ImageOps.exif_transpose(image)
            image = _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(_unreadable(exc)) from None
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
