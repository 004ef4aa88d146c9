"""`captions.html`: a review page for a captioned folder, one self-contained file.

One card per image — thumbnail (a relative link to the image, so the page opens from disk
and stays small), tags, description, caption — failed images first with their reason, a
search box and a filter for failed, guard-triggered, flagged and uncaptioned images. A card
shows what the faithfulness check found: on the caption kept (`flags`, with
`guards.faithfulness: warn`), in replies asked again (`corrected`), or why the image failed.
"Flagged" are the images whose caption was kept with findings or that failed the check. The
page reads `#q=text` and `#filter=failed|guards|flagged|missing` from its address, so a link
can open it filtered.
"""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Dict

from tagcaption.config import Config
from tagcaption.files import atomic_write_text, read_regular
from tagcaption.folder import Folder
from tagcaption.layout import Layout
from tagcaption.sinks import redact
from tagcaption.outputs import read_records
from tagcaption.tagfiles import read_image_tags
from tagcaption.vocabulary import FAITHFULNESS

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Captions: {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 0; background: #f4f4f6; color: #222; }}
header {{ position: sticky; top: 0; background: #fff; padding: 10px 16px; border-bottom: 1px solid #ddd;
          display: flex; gap: 12px; align-items: center; flex-wrap: wrap; z-index: 1; }}
header h1 {{ font-size: 16px; margin: 0 12px 0 0; }}
input, select {{ font: inherit; padding: 4px 8px; }}
#count {{ color: #666; }}
main {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(320px, 1fr)); gap: 12px; padding: 16px; }}
.card {{ background: #fff; border-radius: 8px; padding: 10px; box-shadow: 0 1px 2px #0002; }}
.card[hidden] {{ display: none; }}
.card.failed {{ border-left: 4px solid #c0392b; }}
.card.missing {{ border-left: 4px solid #999; }}
.card img {{ width: 100%; height: 200px; object-fit: contain; background: #eee; border-radius: 4px; }}
.name {{ font-weight: 600; word-break: break-all; margin: 6px 0; }}
.label {{ color: #777; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; margin-top: 6px; }}
.failure {{ color: #c0392b; }}
.caption {{ white-space: pre-line; }}
.badge {{ display: inline-block; background: #fde9c8; border-radius: 4px; padding: 0 6px; margin-right: 4px;
          font-size: 12px; }}
.card.flagged {{ border-left: 4px solid #d68910; }}
.flags li {{ color: #9a5b00; }}
.corrected li {{ color: #555; }}
ul {{ margin: 2px 0; padding-left: 18px; }}
</style></head><body>
<header><h1>{title}</h1>
<input id="search" type="search" placeholder="Search file, tags, caption…" aria-label="Search">
<select id="filter" aria-label="Filter"><option value="all">all images</option><option value="failed">failed</option>
<option value="guards">guard triggered</option><option value="flagged">flagged by the faithfulness check</option>
<option value="missing">no caption</option></select>
<span id="count"></span></header>
<main id="cards">
{cards}
</main>
<script>
const cards = Array.from(document.querySelectorAll('.card'));
const search = document.getElementById('search'), filter = document.getElementById('filter');
const params = new URLSearchParams(location.hash.slice(1));
search.value = params.get('q') || '';
filter.value = params.get('filter') || 'all';
function apply() {{
  const q = search.value.toLowerCase(), f = filter.value;
  let shown = 0;
  for (const card of cards) {{
    const match = (!q || card.dataset.text.includes(q)) && (f === 'all' || card.dataset.kind.split(' ').includes(f));
    card.hidden = !match;
    if (match) shown++;
  }}
  document.getElementById('count').textContent = shown + ' of ' + cards.length + ' images';
}}
search.addEventListener('input', apply);
filter.addEventListener('change', apply);
apply();
</script></body></html>
"""


def _card(entry: dict, page_dir: Path) -> str:
    entry = {key: redact(value) if isinstance(value, str) else value for key, value in entry.items()}
    kinds = [entry["status"]] + (["guards"] if entry.get("guards") else []) + (["flagged"] if _flagged(entry) else [])
    text = " ".join([str(entry.get(key) or "") for key in ("file", "tags", "description", "caption", "failure")]
                    + entry.get("flags", []))
    src = os.path.relpath(entry["path"], page_dir)
    classes = entry["status"] + (" flagged" if entry.get("flags") else "")
    parts = [f'<article class="card {classes}" data-kind="{" ".join(kinds)}" '
             f'data-text="{html.escape(text.lower(), quote=True)}">',
             f'<img loading="lazy" src="{html.escape(Path(src).as_posix(), quote=True)}" alt="">',
             f'<div class="name">{html.escape(entry["file"])}</div>']
    if entry.get("failure"):
        parts.append(f'<div class="label">failed</div><div class="failure">{html.escape(entry["failure"])}</div>')
    if entry.get("guards"):
        parts.append('<div class="label">guards</div><div>' + "".join(
            f'<span class="badge">{html.escape(name.replace("_", " "))}</span>' for name in entry["guards"]) + "</div>")
    for key, label in (("flags", "faithfulness check found"), ("corrected", "asked again to fix")):
        if entry.get(key):
            parts.append(f'<div class="label">{label}</div><ul class="{key}">' + "".join(
                f"<li>{html.escape(str(finding))}</li>" for finding in entry[key]) + "</ul>")
    for label in ("tags", "description", "caption"):
        if entry.get(label):
            parts.append(f'<div class="label">{label}</div><div class="{label}">{html.escape(entry[label])}</div>')
    parts.append("</article>")
    return "".join(parts)


def build_report(config: Config) -> Path:
    """Write captions.html at the output root from the folder as it is now."""
    layout = Layout(config)
    records = {record.get("file"): record for path in (layout.captions_jsonl, layout.records)
               for record in read_records(path)}  # the state's records win: they have every description
    failures: Dict[str, dict] = {}
    for path in sorted(layout.root.glob("failures*.jsonl")):
        for record in read_records(path):
            failures[record.get("image", "")] = record
    entries = [_entry(config, layout, path, records, failures)
               for path in Folder(layout.images_root, config.recursive, skip=layout.output_dir).images()]
    order = {"failed": 0, "missing": 1, "captioned": 2}
    entries.sort(key=lambda entry: (order[entry["status"]], not entry["flags"], entry["file"]))
    page = layout.report_page
    cards = "\n".join(_card(entry, page.parent) for entry in entries)
    page.parent.mkdir(parents=True, exist_ok=True)  # an output.dir not made yet
    atomic_write_text(page, PAGE.format(title=html.escape(str(layout.images_root.name)), cards=cards))
    return page


def _flagged(entry: dict) -> bool:
    return bool(entry.get("flags")) or entry.get("failure_kind") == f"guard_{FAITHFULNESS}"


def _entry(config: Config, layout: Layout, path: Path, records: Dict[str, dict], failures: Dict[str, dict]) -> dict:
    """One card's facts; an image whose files cannot be read gets a card saying so."""
    try:
        item = layout.item(path)
    except OSError as exc:
        rel = path.relative_to(layout.images_root).as_posix()
        return {"file": rel, "path": path, "tags": "", "description": "", "caption": "", "guards": [], "flags": [],
                "failure": f"cannot read its files: {exc.strerror or exc}", "status": "failed"}
    rel = item.rel.as_posix()
    record = records.get(rel, {})
    try:
        tags = ", ".join(t.replace("_", " ") for t in read_image_tags(item.path, item.tags_file, config.tags.sources,
                                                                       config.tags.combine, item.not_sidecar).tags)
    except (OSError, ValueError):
        tags = ""
    try:
        captioned = item.has_caption()
    except OSError:
        captioned = False
    try:
        caption = read_regular(item.caption_file).decode("utf-8", "replace") if captioned else ""
    except OSError as exc:  # a FIFO or a folder where the caption would be: this card says so, not the page
        captioned, caption = False, ""
        failures = {str(item.path): {"message": f"cannot read its caption: {exc.strerror or exc}"}}
    failed = failures.get(str(item.path), {}) if not captioned else {}
    failure = failed.get("message", "")
    return {"file": rel, "path": item.path, "tags": record.get("tags") or tags,
            "description": record.get("description", ""), "caption": caption,
            "guards": record.get("guards", []), "failure": failure, "failure_kind": failed.get("kind"),
            "flags": _listed(record.get("flags")) if captioned else [],
            "corrected": _listed(record.get("corrected")) if captioned else [],
            "status": "captioned" if captioned else ("failed" if failure else "missing")}


def _listed(value: object) -> list:
    """A record's list of findings (anything else in a hand-edited file: none)."""
    return [str(item) for item in value] if isinstance(value, list) else []
