"""A hand-written three-stage client: the least a script could do for the same captions.

The yardstick of bench/vs_reference.py. It sends the requests caption.py sends for the
three stages — one summary per distinct tag, one vision request and one caption request
per image — with the same concurrency, and schedules them as well as they can be: every
image starts at once, its vision request leaves at once, and its caption request leaves the
moment its description and its tags' summaries are in. It has no guards, no retries, no
cache, no records and no checks, and writes `<stem>.ref` beside each image.

    python bench/reference_client.py IMAGES_DIR BASE_URL CONCURRENCY
"""
from __future__ import annotations

import asyncio
import base64
import sys
from pathlib import Path

import httpx2

SUMMARY = 'Summarise what this Danbooru tag means in one sentence.\n\nTag: "{tag}"'
CAPTION = "Write a short caption of the image.\n\nTags:\n{tags}\n\nWhat they mean:\n{meanings}\n\nDescription:\n{text}"


async def main(folder: Path, base_url: str, concurrency: int) -> None:
    gate = asyncio.Semaphore(concurrency)
    limits = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx2.AsyncClient(base_url=base_url, timeout=600, limits=limits, trust_env=False) as client:
        async def chat(content) -> str:
            async with gate:
                response = await client.post("/chat/completions", json={
                    "model": "m", "max_tokens": 300, "messages": [{"role": "user", "content": content}]})
            return response.json()["choices"][0]["message"]["content"]

        summaries = {}

        def summary(tag: str) -> asyncio.Future:
            if tag not in summaries:
                summaries[tag] = asyncio.ensure_future(chat(SUMMARY.format(tag=tag)))
            return summaries[tag]

        async def caption(image: Path) -> None:
            tags = [tag.strip() for tag in image.with_suffix(".txt").read_text().split(",") if tag.strip()]
            meanings = [summary(tag) for tag in tags]
            url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
            text = await chat([{"type": "text", "text": "Describe this image in detail."},
                               {"type": "image_url", "image_url": {"url": url}}])
            lines = [f"{tag}: {meaning}" for tag, meaning in zip(tags, await asyncio.gather(*meanings))]
            reply = await chat(CAPTION.format(tags=", ".join(tags), meanings="\n".join(lines), text=text))
            image.with_suffix(".ref").write_text(reply)

        await asyncio.gather(*(caption(image) for image in sorted(folder.glob("*.png"))))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))
