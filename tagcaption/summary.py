"""The end-of-run summary: what happened, in a few lines, and every failure once."""
from __future__ import annotations

from typing import List

from tagcaption.pipeline import RunResult

STAGES = ("tag_provider", "interrogator", "interpreter")


def format_summary(result: RunResult) -> str:
    if result.dry_run_report is not None:
        return (f"\nDry run summary: {result.captioned} images would be captioned, {result.skipped} skipped "
                f"(caption exists), {len(result.failures)} would fail")
    lines: List[str] = ["", "Summary"]
    images = [f"{result.captioned} captioned", f"{result.skipped} skipped (caption exists)",
              f"{len(result.failures)} failed"]
    if result.unfinished:
        images.append(f"{result.unfinished} not started (rerun to continue)")
    if result.unchecked:
        images.append(f"{result.unchecked} not reached (rerun to continue)")
    lines.append(f"  images:   {', '.join(images)}")
    if result.shrunk:
        lines.append(f"  shrunk:   {result.shrunk} images sent again at half size after a context overflow")
    if result.backups:
        lines.append(f"  backups:  {result.backups} replaced captions kept as <caption>.bak")
    if result.tags is not None:
        tags = result.tags
        parts = [f"{tags.summarised} summarised", f"{tags.cached} cached", f"{tags.no_wiki} without wiki"]
        if tags.resummarised:
            parts.append(f"{tags.resummarised} summarised again (model or template changed)")
        if tags.excluded:
            parts.append(f"{tags.excluded} excluded")
        if tags.refused:
            parts.append(f"{tags.refused} without summary (the model's replies tripped a guard)")
        if tags.lookup_failed:
            parts.append(f"{tags.lookup_failed} not looked up (lookup error)")
        if tags.failed:
            parts.append(f"{tags.failed} failed")
        lines.append(f"  tags:     {', '.join(parts)}; {result.danbooru_requests} Danbooru requests")
    if result.danbooru_down:
        lines.append(f"  danbooru: {result.danbooru_down}; captions were made with tags only")
    for stage in STAGES:
        usage = result.usage.get(stage)
        if usage and usage.requests:
            retries = f" ({usage.retries} retries)" if usage.retries else ""
            lines.append(f"  {stage + ':':<13} {usage.requests} requests{retries}, {usage.prompt_tokens:,} prompt + "
                         f"{usage.completion_tokens:,} completion tokens")
    if result.guards:
        tripped = ", ".join(f"{name.replace('_', ' ')} {count}" for name, count in sorted(result.guards.items()))
        lines.append(f"  guards:   replies asked again: {tripped}")
    lines.append(f"  time:     {result.seconds:.1f} s")
    if result.stopped:
        lines.append(f"  stopped:  {result.stopped}")
    if result.failures:
        lines.append("Failures:")
        lines.extend(f"  {failure.image}: {failure.message}" for failure in result.failures)
    if result.report_page:
        lines.append(f"Review page: {result.report_page}")
    if result.failures_file and result.failures:
        lines.append(f"Failures are listed in {result.failures_file}; `--retry-failed` reruns just those images.")
    return "\n".join(lines)
