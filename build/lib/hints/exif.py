"""Camera, lens and date taken from a photo's EXIF data."""
from __future__ import annotations

from typing import Optional

from PIL import Image

MAKE, MODEL, DATE = 0x010F, 0x0110, 0x0132
EXIF_IFD = 0x8769
DATE_TAKEN, LENS_MODEL, FOCAL_LENGTH = 0x9003, 0xA434, 0x920A


def hint(image) -> Optional[str]:
    with Image.open(image.path) as picture:
        exif = picture.getexif()
        details = exif.get_ifd(EXIF_IFD)
    make, model = _text(exif.get(MAKE)), _text(exif.get(MODEL))
    camera = model if make and model.lower().startswith(make.lower()) else " ".join(p for p in (make, model) if p)
    parts = []
    if camera:
        parts.append(f"camera {camera}")
    lens = _text(details.get(LENS_MODEL))
    if lens:
        parts.append(f"lens {lens}")
    focal = details.get(FOCAL_LENGTH)
    if focal:
        parts.append(f"focal length {float(focal):g} mm")
    taken = _text(details.get(DATE_TAKEN)) or _text(exif.get(DATE))
    if taken:
        parts.append(f"taken {taken}")
    return "Photo: " + ", ".join(parts) if parts else None


def _text(value) -> str:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip().strip("\x00").strip() if value else ""
