"""The prompt a Stable Diffusion picture was generated from, read from the file itself:
A1111/Forge `parameters` PNG text, ComfyUI `prompt`/`workflow` PNG text, or the EXIF
UserComment A1111 writes into JPEG and WebP files. Only the prompt text is kept."""
from __future__ import annotations

import json
from typing import Optional

from PIL import Image

USER_COMMENT = 0x9286
EXIF_IFD = 0x8769


def hint(image) -> Optional[str]:
    with Image.open(image.path) as picture:
        text = picture.info if isinstance(picture.info, dict) else {}
        prompt = (_a1111(text.get("parameters")) or _comfy_prompt(text.get("prompt"))
                  or _comfy_workflow(text.get("workflow")) or _a1111(_user_comment(picture)))
    return f"Generation prompt: {prompt}" if prompt else None


def _a1111(parameters) -> Optional[str]:
    if not isinstance(parameters, str) or not parameters.strip():
        return None
    prompt = parameters.split("\nNegative prompt:", 1)[0]
    if "\nSteps:" in prompt:
        prompt = prompt.split("\nSteps:", 1)[0]
    return " ".join(prompt.split()) or None


def _comfy_prompt(raw) -> Optional[str]:
    """The text of the CLIPTextEncode node that feeds a sampler's `positive` input."""
    try:
        graph = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    if not isinstance(graph, dict):
        return None
    nodes = {key: node for key, node in graph.items() if isinstance(node, dict)}
    for node in nodes.values():
        positive = (node.get("inputs") or {}).get("positive")
        if "Sampler" in str(node.get("class_type")) and isinstance(positive, list) and positive:
            text = (nodes.get(str(positive[0]), {}).get("inputs") or {}).get("text")
            if isinstance(text, str) and text.strip():
                return " ".join(text.split())
    for node in nodes.values():
        text = (node.get("inputs") or {}).get("text")
        if "TextEncode" in str(node.get("class_type")) and isinstance(text, str) and text.strip():
            return " ".join(text.split())
    return None


def _comfy_workflow(raw) -> Optional[str]:
    try:
        workflow = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return None
    for node in (workflow or {}).get("nodes", []) if isinstance(workflow, dict) else []:
        values = node.get("widgets_values") if isinstance(node, dict) else None
        if "TextEncode" in str(node.get("type")) and values and isinstance(values[0], str) and values[0].strip():
            return " ".join(values[0].split())
    return None


def _user_comment(picture) -> Optional[str]:
    try:
        raw = picture.getexif().get_ifd(EXIF_IFD).get(USER_COMMENT)
    except Exception:  # damaged EXIF: no comment
        return None
    if isinstance(raw, bytes):
        if raw.startswith(b"UNICODE\0"):
            body = raw[8:]
            return body.decode("utf-16-be" if body[:1] == b"\0" else "utf-16-le", "replace")
        return raw.split(b"\0", 1)[-1].decode("utf-8", "replace") if raw.startswith(b"ASCII") else \
            raw.decode("utf-8", "replace")
    return raw if isinstance(raw, str) else None
