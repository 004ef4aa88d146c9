"""The image's path inside the images folder: folder names often say who or what it shows."""


def hint(image) -> str:
    return f"File path: {image.rel.as_posix()}"
