"""`--dry-run`: everything a run would send, shown instead of sent.

The LLM client is replaced by one that records each request and answers with a
placeholder, so the pipeline runs exactly as it would — templates, hints, image
preparation, multi-turn conversations — without a server and without writing a file.
The first images' requests are printed whole; for the folder, the requests per stage
and an estimate of the prompt tokens.
"""
from __future__ import annotations


from collections import Counter, defaultdict
from typing import Any, Dict, List, Optional

from tagcaption.llm import LLM
from tagcaption.tag_sources import TagInfo


class DryRunLLM(LLM):
    def __init__(self, llm: LLM):
        super().__init__(llm.endpoints, llm.guards, tally=llm.tally)
        self.requests: Counter = Counter()
        self.characters: Counter = Counter()
        self.images: Counter = Counter()
        self.examples: Dict[str, List[list]] = defaultdict(list)
        self.bodies: Dict[str, List[dict]] = defaultdict(list)
        """What the first requests of a stage carry beside the prompt (a variant's seed, a response_format)."""

    async def complete(self, stage: str, settings, messages: List[Dict[str, Any]], clean=None, final=False,
                       trips: Optional[List[str]] = None, body: Optional[Dict[str, Any]] = None,
                       check=None) -> str:
        self.requests[stage] += 1
        if body and len(self.bodies[stage]) < 20:
            self.bodies[stage].append(body)
        for message in messages:
            content = message["content"]
            if isinstance(content, list):
                self.images[stage] += sum(1 for part in content if part.get("type") == "image_url")
                content = " ".join(part.get("text", "") for part in content if part.get("type") == "text")
            self.characters[stage] += len(content)
        if stage == "tag_provider" and len(self.examples[stage]) < 1:
            self.examples[stage].append(messages)
        turn = sum(1 for message in messages if message["role"] == "user")
        return f"[{settings.model} would answer here (turn {turn})]"


def format_preview(transcripts: List[tuple], llm: DryRunLLM, plan: List[str] = ()) -> str:
    lines = ["", "Dry run: nothing was sent to a model and no file was written."]
    lines += [f"plan: {line}" for line in plan]
    for example in llm.examples.get("tag_provider", []):
        lines += ["", "=== tag summary request (one of them) ===", _messages(example)]
    for image, transcript in transcripts:
        lines += ["", f"=== {image} ==="]
        for stage in ("interrogator", "interpreter"):
            if stage in transcript and "variants" in transcript and _captions_by(transcript) == stage:
                variants = transcript["variants"]
                for number, conversation in enumerate(variants, 1):
                    same = number > 1 and conversation[:-1] == variants[0][:-1]
                    lines += [f"--- {stage}, caption {number} of {len(variants)} ---",
                              "(the same prompt as caption 1, with its own seed)" if same else _messages(conversation)]
            elif stage in transcript:
                lines += [f"--- {stage} ---", _messages(transcript[stage])]
        if "interrogator" not in transcript and "interpreter" not in transcript:
            lines.append("(no request: the image would fail before reaching a model)")
    lines += _bodies(llm)
    lines += ["", "For the whole folder (tag summaries: at most, as tags without a wiki page need none):"]
    for stage in ("tag_provider", "interrogator", "interpreter"):
        if llm.requests[stage]:
            images = f" and {llm.images[stage]} images" if llm.images[stage] else ""
            lines.append(f"  {stage + ':':<13} {llm.requests[stage]} requests, about "
                         f"{llm.characters[stage] // 4:,} prompt tokens of text{images}")
    return "\n".join(lines)


def _captions_by(transcript: dict) -> str:
    """The stage whose conversations `transcript["variants"]` holds: the one writing the captions."""
    return "interpreter" if "interpreter" in transcript else "interrogator"


def _bodies(llm: DryRunLLM) -> List[str]:
    """What the requests carry beside the prompt: each caption's seed, the response_format."""
    lines = []
    for stage, bodies in llm.bodies.items():
        seeds = [str(body["seed"]) for body in bodies if "seed" in body]
        formats = {body["response_format"]["json_schema"]["name"] for body in bodies if "response_format" in body}
        if seeds:
            lines.append(f"{stage} requests carry a seed per caption: {', '.join(seeds[:8])}"
                         f"{', …' if len(seeds) > 8 else ''}")
        if formats:
            lines.append(f"{stage} requests carry response_format json_schema '{', '.join(sorted(formats))}' (strict)")
    return [""] + lines if lines else []


def _messages(messages: List[dict]) -> str:
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            content = "\n".join(part.get("text") or f"<image {part.get('image_url')}>" for part in content)
        out.append(f"[{message['role']}]\n{content}")
    return "\n".join(out)


class DryRunSource:
    """Stands in for Danbooru in a dry run: every uncached tag is taken to have a wiki page,
    so the summary requests counted are the most a real run could make."""

    def describe(self) -> str:
        return "no tag source (dry run)"

    async def lookup(self, names: List[str]) -> Dict[str, TagInfo]:
        return {name: TagInfo(name, wiki=f"[the wiki page of '{name}' would be here]") for name in names}

    async def close(self) -> None:
        pass
