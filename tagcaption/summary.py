"""The end-of-run summary: what happened, in a few lines, and every failure once."""
from __future__ import annotations

from typing import List

from tagcaption.run import RunResult
from tagcaption.tally import Tally
from tagcaption.vocabulary import STAGES

TAG_COUNTS = (("summarised", "{} summarised"), ("cached", "{} cached"), ("no_wiki", "{} without wiki"),
              ("resummarised", "{} summarised again (model or template changed)"), ("excluded", "{} excluded"),
              ("refused", "{} without summary (the model's replies tripped a guard)"),
              ("lookup_failed", "{} not looked up (lookup error)"), ("failed", "{} failed"),
              ("aliased", "{} aliases resolved"))
ALWAYS_SHOWN = ("summarised", "cached", "no_wiki")
NAMES_DOC = "names-need-tag-categories"
"""The section of docs/styles-and-guards.md on names the faithfulness check cannot require."""
FAILURES_SHOWN = 20
"""Failures listed in the summary; all of them are in failures.jsonl."""


def _shown(text: str) -> str:
    """One line, whatever a file name holds (a newline or ESC would forge or drive the terminal)."""
    return "".join(repr(char)[1:-1] if char.isprintable() is False and char != " " else char for char in text)


def plural(count: int, word: str, words: str = "") -> str:
    return f"{count} {word if count == 1 else words or word + 's'}"


def format_summary(result: RunResult) -> str:
    tally = result.tally
    if result.dry_run_report is not None:
        return (f"\nDry run summary: {plural(tally['images.captioned'], 'image')} would be captioned, "
                f"{tally['images.skipped']} skipped (caption exists), {len(result.failures)} would fail")
    lines: List[str] = ["", "Summary", f"  images:   {', '.join(_image_counts(result))}"]
    if tally["images.shrunk"]:
        lines.append(f"  shrunk:   {tally['images.shrunk']} images sent again at half size after a context overflow")
    if tally["images.backups"]:
        lines.append(f"  backups:  {tally['images.backups']} replaced captions kept as <caption>.bak")
    if result.plan.lookups:
        lines.append(f"  tags:     {_tag_counts(tally)}; {plural(tally['danbooru.requests'], 'Danbooru request')}")
    if tally.notes.get("danbooru.down"):
        lines.append(f"  danbooru: {tally.notes['danbooru.down']}; captions were made with tags only")
    lines += _usage(tally)
    guards = tally.group("guards")
    if guards:
        tripped = ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in sorted(guards.items()))
        lines.append(f"  guards:   replies asked again: {tripped}")
    if tally["images.flagged"]:
        lines.append(f"  flagged:  {plural(tally['images.flagged'], 'caption')} kept with faithfulness findings: "
                     "see `flags` in their records or the review page")
    if tally["images.names_unchecked"] and (not result.plan.lookups or tally.notes.get("danbooru.down")
                                            or tally["tags.lookup_failed"]):
        lines.append(f"  names:    not checked for {plural(tally['images.names_unchecked'], 'image')}: their tags' "
                     "categories are unknown (no sidecar and no tag source answered); see "
                     f"docs/styles-and-guards.md#{NAMES_DOC}")
    lines.append(f"  time:     {result.seconds:.1f} s")
    if result.stopped:
        lines.append(f"  stopped:  {result.stopped}")
    if result.nothing_to_do:
        lines.append(f"  nothing to do: {result.nothing_to_do}")
    if result.failures:
        lines.append("Failures:")
        lines.extend(f"  {_shown(failure.image)}: {_shown(failure.message)}"
                     for failure in result.failures[:FAILURES_SHOWN])
        if len(result.failures) > FAILURES_SHOWN:
            lines.append(f"  … and {len(result.failures) - FAILURES_SHOWN} more (all in {result.failures_file})")
    if result.tally["images.captioned"]:
        lines.append(f"Captions: {result.captions_at}")
    if result.report_page:
        lines.append(f"Review page: {result.report_page}")
    if result.failures_file and result.failures:
        lines.append(f"Failures are listed in {result.failures_file}; `--retry-failed` reruns just those images.")
    if result.next_step:
        lines.append(f"Next: {result.next_step}")
    return "\n".join(lines)


def _image_counts(result: RunResult) -> List[str]:
    images = [f"{result.tally['images.captioned']} captioned", f"{result.tally['images.skipped']} skipped "
              "(caption exists)", f"{len(result.failures)} failed"]
    if result.unfinished:
        images.append(f"{result.unfinished} not started")
    if result.unreached:
        images.append(f"{result.unreached} not reached")
    return images


def _tag_counts(tally: Tally) -> str:
    return ", ".join(text.format(tally[f"tags.{key}"]) for key, text in TAG_COUNTS
                     if key in ALWAYS_SHOWN or tally[f"tags.{key}"])


def _usage(tally: Tally) -> List[str]:
    lines = []
    for stage in STAGES:
        requests = tally[f"requests.{stage}"]
        if requests:
            retries = f" ({plural(tally[f'retries.{stage}'], 'retry', 'retries')})" if tally[f"retries.{stage}"] else ""
            parts = [f"{tally[f'{kind}_tokens.{stage}']:,} {kind}" for kind in ("image", "cached")
                     if tally[f"{kind}_tokens.{stage}"]]
            detail = f" ({', '.join(parts)})" if parts else ""
            lines.append(f"  {stage + ':':<13} {plural(requests, 'request')}{retries}, {tally[f'prompt_tokens.{stage}']:,} "
                         f"prompt{detail} + {tally[f'completion_tokens.{stage}']:,} completion tokens")
    captioned = tally["images.captioned"]
    if lines and captioned:
        prompt = sum(tally[f"prompt_tokens.{stage}"] for stage in STAGES)
        completion = sum(tally[f"completion_tokens.{stage}"] for stage in STAGES)
        if prompt + completion:
            lines.append(f"  tokens:   {(prompt + completion) // captioned:,} per caption on average "
                         f"({prompt // captioned:,} prompt + {completion // captioned:,} completion)")
    return lines
