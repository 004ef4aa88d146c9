"""Turning an image file into what a vision model is sent: a base64 data URL.

Servers ignore EXIF rotation, LM Studio cannot read WebP and large pictures cost
thousands of tokens, so an image is oriented, flattened to RGB, downscaled and re-encoded
as JPEG (or PNG) here — unless it already is an upright JPEG or PNG within the size limit,
which is sent as it is (`image_format: auto`, the default): decoding and re-encoding such a
file costs the client more than the rest of its request and gives the server nothing. This is CPU work: call it in a thread. AVIF is read by
Pillow itself; HEIC/HEIF when the `pillow-heif` package is installed.
"""
from __future__ import annotations

import base64
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from tagcaption.errors import ImageError
from tagcaption.wire import DataURL

BACKGROUND = (255, 255, 255)

try:  # optional: HEIC/HEIF photos from phones
    import pillow_heif

    pillow_heif.register_heif_opener()
except ImportError:
    pass

# Pillow only warns between MAX_IMAGE_PIXELS and twice that; a picture that big is refused.
warnings.simplefilter("error", Image.DecompressionBombWarning)


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
        _regular(path)
        with Image.open(path) as image:
            if image.format == "JPEG":
                image.draft("RGB", (64, 64))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _image_error(f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _image_error(_unreadable(exc)) from None


def _regular(path) -> None:
    """A FIFO, device or socket is refused before it is opened (opening one waits forever)."""
    if isinstance(path, Path) and not stat.S_ISREG(os.stat(path).st_mode):
        raise _image_error("not a regular file (a FIFO, device or socket)")


def _image_error(reason: str) -> ImageError:
    return ImageError(f"image: {reason}", stage="input")


def _unreadable(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not a readable image (unknown format or damaged file)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read the file ({exc.strerror})"
    return f"not a readable image ({exc or type(exc).__name__})"


@dataclass(frozen=True)
class ImageOptions:
    max_size: int = 1536
    """Longest side in pixels; 0 = never resize. Never upscaled."""
    image_format: str = "auto"
    """auto (the file's own bytes when every server reads them as they are, else JPEG) | jpeg |
    png | original (the file's own bytes whenever it needs no rotation or resize)."""
    jpeg_quality: int = 90
    background: tuple = BACKGROUND


ORIGINAL_MIME = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
AUTO_MODES = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "L")}
"""What `auto` sends as it is: JPEG and PNG (LM Studio cannot read WebP), 8-bit RGB or grey."""
AUTO_MAX_BYTES = 4 * 1024 * 1024
"""Above this, `auto` re-encodes even a file it could send as it is (servers refuse big bodies)."""
FILE_ENDS = {"JPEG": b"\xff\xd9", "PNG": b"IEND\xaeB`\x82"}
"""How a whole JPEG (EOI) or PNG (IEND) ends: a file sent as it is must end so, or be re-encoded
(which fails a truncated one here, not on the server)."""


def prepare_image(path: Path, options: ImageOptions = ImageOptions()) -> PreparedImage:
    """The picture as the user sees it: EXIF orientation applied, first frame of an
    animation, transparency flattened onto the background, at most `max_size` on its long
    side, encoded as JPEG or PNG with the matching MIME type — or the file's own bytes
    when they already are that (`auto`, `original`). The file is read once."""
    try:
        _regular(path)
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            if _sendable(image, data, options):
                return _prepared(data, ORIGINAL_MIME[image.format], image.size)
            if options.max_size and image.format == "JPEG":
                _draft(image, options.max_size)
            untouched = _orientation(image) in (None, 1)
            image.seek(0)
            image.load()
            if not untouched:
                image = ImageOps.exif_transpose(image)
            too_big = bool(options.max_size) and max(image.size) > options.max_size
            image = _flatten(image, options.background)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _image_error(f"refused as a decompression bomb ({exc})") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise _image_error(_unreadable(exc)) from None
    if too_big:
        image.thumbnail((options.max_size, options.max_size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if options.image_format == "png":
        image.save(buffer, format="PNG", optimize=False)
        mime = "image/png"
    else:
        image.save(buffer, format="JPEG", quality=options.jpeg_quality)
        mime = "image/jpeg"
    return _prepared(buffer.getvalue(), mime, image.size)


def _sendable(image: Image.Image, data: bytes, options: ImageOptions) -> bool:
    """Whether the file's own bytes can go as they are: no rotation, no resize, one frame,
    and for `auto` a JPEG or PNG in a mode every server reads, not too big, whole. This
    reads headers only: the bytes are checked by how they end, not decoded."""
    if options.image_format not in ("auto", "original") or image.format not in ORIGINAL_MIME:
        return False
    if _orientation(image) not in (None, 1) or getattr(image, "is_animated", False) \
            or (options.max_size and max(image.size) > options.max_size):
        return False
    if options.image_format == "original":
        if image.format not in FILE_ENDS:
            image.load()  # a damaged file must fail here, not on the server
        return image.format not in FILE_ENDS or data.endswith(FILE_ENDS[image.format])
    return (image.mode in AUTO_MODES.get(image.format, ()) and len(data) <= AUTO_MAX_BYTES
            and "transparency" not in image.info and _eight_bit(image) and data.endswith(FILE_ENDS[image.format]))


def _eight_bit(image: Image.Image) -> bool:
    """A PNG's samples are 8-bit (Pillow shows a 48-bit PNG as RGB, read from `RGB;16B`)."""
    return image.format != "PNG" or all(tile.args == image.mode for tile in image.tile)


DRAFT_SLACK = 0.75


def _draft(image: Image.Image, max_size: int) -> None:
    """Decode a JPEG at 1/2, 1/4 or 1/8 scale when that lands within a quarter below
    `max_size`: far cheaper than decoding 24 megapixels and resampling them."""
    long_side = max(image.size)
    if long_side <= max_size:
        return
    factor = DRAFT_SLACK * max_size / long_side
    image.draft("RGB", (max(1, int(image.size[0] * factor)), max(1, int(image.size[1] * factor))))


def _prepared(data: bytes, mime: str, size) -> PreparedImage:
    raw = b"data:" + mime.encode("ascii") + b";base64," + base64.b64encode(data)
    return PreparedImage(DataURL.of(raw), size[0], size[1], mime, len(data))


def _orientation(image: Image.Image):
    try:
        return image.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block: treat as no orientation
        return None


def _flatten(image: Image.Image, background: tuple) -> Image.Image:
    """RGB from any mode: palette and alpha flattened onto `background`, 16-bit scaled down."""
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        flat = Image.new("RGB", image.size, background)
        flat.paste(rgba, mask=rgba.getchannel("A"))
        return flat
    if image.mode.startswith("I;16") or image.mode == "I":
        image = image.convert("I").point(lambda value: value * (1 / 256)).convert("L")
    return image.convert("RGB")


# --- images held in memory (a dataset row's image: hf_dataset.py) ---------------------------

PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")


class _InMemory(io.BytesIO):
    """An image's bytes standing in for its file: `Image.open` reads it, and `read_bytes`
    gives the bytes back, as `prepare_image` asks of a path for `image_format: original`."""

    def read_bytes(self) -> bytes:
        return self.getvalue()


def _in_memory(data) -> _InMemory:
    """Bytes as they are; a decoded PIL image saved losslessly as PNG, to be read like a file."""
    if not isinstance(data, Image.Image):
        return _InMemory(bytes(data))
    buffer = _InMemory()
    try:
        (data if data.mode in PNG_MODES else data.convert("RGB")).save(buffer, format="PNG")
    except (OSError, ValueError) as exc:
        raise _image_error(f"cannot encode the row's image ({exc})") from None
    buffer.seek(0)
    return buffer


def check_image_data(data) -> None:
    """`check_image` for an image held in memory: bytes or a PIL image, never written to disk."""
    check_image(_in_memory(data))


def prepare_image_bytes(data, options: ImageOptions = ImageOptions()) -> PreparedImage:
    """`prepare_image` for an image held in memory: bytes or a PIL image, never written to disk."""
    return prepare_image(_in_memory(data), options)


def parse_color(value: str) -> tuple:
    """`#rrggbb`, `rrggbb` or a colour name, as an RGB tuple."""
    from PIL import ImageColor

    try:
        return ImageColor.getrgb(value if not value[:1].isalnum() or len(value) != 6 else f"#{value}")[:3]
    except ValueError:
        raise ValueError(f"not a colour: {value!r}") from None
