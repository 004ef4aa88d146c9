"""Side by side with vlm-caption (not part of the test suite).

Runs a checkout of victorchall/vlm-caption, which this script never downloads (give its
path, and the Python of a virtualenv with its four dependencies: openai, pillow, aiofiles,
omegaconf), and this project's caption.py on the same loopback LLM server
(bench/fast_server.py: a set latency within a set number of slots), on the same JPEGs, at
the same concurrency, vision only with one prompt. Runs go in pairs, in alternating order
so that a host getting slower or faster shifts neither side; each run gets a fresh server.
Prints each run's wall time, the client's CPU time from its own rusage (the server runs in
another process), and at the end the medians and the ratio of the walls.

    python -m venv /tmp/peer-venv && /tmp/peer-venv/bin/pip install openai pillow aiofiles omegaconf
    python bench/vs_peer.py /path/to/vlm-caption --peer-python /tmp/peer-venv/bin/python --pairs 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench")]

from fast_server import FastServer  # noqa: E402

PROMPT = "Describe this image in detail."


@dataclass
class Timed:
    wall: float
    cpu: float
    requests: int
    exit_code: int
    tail: str


def make_jpegs(folder: Path, count: int, size=(1024, 768)) -> float:
    """`count` distinct photo-like JPEGs (quality 90); returns their mean size in KB."""
    from PIL import Image, ImageDraw, ImageFilter

    folder.mkdir(parents=True, exist_ok=True)
    base = Image.radial_gradient("L").resize(size).convert("RGB")
    noise = Image.effect_noise(size, 60).convert("RGB").filter(ImageFilter.GaussianBlur(0.7))
    base = Image.blend(base, noise, 0.5)
    for n in range(count):
        image = base.copy()
        x, y = (n * 37) % (size[0] - 80), (n * 53) % (size[1] - 60)
        ImageDraw.Draw(image).rectangle([x, y, x + 80, y + 60], fill=((n * 37) % 256, (n * 11) % 256, 90))
        image.save(folder / f"{n:05}.jpg", quality=90)
    return sum(path.stat().st_size for path in folder.glob("*.jpg")) / count / 1024


def timed(command: List[str], cwd: Path) -> tuple:
    started = time.monotonic()
    child = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    return time.monotonic() - started, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status), out


def run_ours(images: Path, scratch: Path, server: FastServer, concurrency: int, overrides: List[str],
             root: Path = ROOT) -> Timed:
    config = scratch / "ours.json"
    config.write_text(json.dumps({
        "endpoints": {"default": {"base_url": server.base_url, "concurrency": concurrency, "timeout": 60}},
        "tags_extension": None, "tag_provider": {"skip": True}, "interpreter": {"skip": True},
        "interrogator": {"skip": False, "model": "m", "prompts": [PROMPT]},
        "output": {"extension": ".caption", "dir": str(scratch / f"out-{time.monotonic_ns()}")}}))
    wall, cpu, code, out = timed([sys.executable, str(root / "caption.py"), str(images), "--config", str(config),
                                  "--no-progress", *overrides], root)
    return Timed(wall, cpu, server.stop()["requests"], code, out.strip().splitlines()[-1] if out.strip() else "")


def run_peer(images: Path, scratch: Path, server: FastServer, concurrency: int, peer: Path, python: str) -> Timed:
    """vlm-caption reads caption.yaml from its working folder and writes <stem>.txt beside each
    image (removed after the run, so that every run captions every image)."""
    work = scratch / "peer"
    work.mkdir(exist_ok=True)
    (work / "caption.yaml").write_text(json.dumps({
        "base_url": server.base_url, "api_key": "no-key", "api_key_env_vars": [], "model": "m", "max_tokens": 512,
        "concurrent_batch_size": concurrency, "system_prompt": "", "global_metadata_file": "", "prompts": [PROMPT],
        "retry_rules": [], "hint_sources": [], "base_directory": str(images), "recursive": False,
        "skip_if_caption_exists": False, "output_format": "txt"}))
    wall, cpu, code, out = timed([python, str(peer / "caption_openai.py")], work)
    for caption in images.glob("*.txt"):
        caption.unlink()
    return Timed(wall, cpu, server.stop()["requests"], code, out.strip().splitlines()[-1] if out.strip() else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("peer", type=Path, help="a checkout of victorchall/vlm-caption")
    parser.add_argument("--peer-python", required=True, help="the Python of a virtualenv with its dependencies")
    parser.add_argument("--images", type=int, default=800)
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.1, help="seconds per request")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for this project's runs, e.g. interrogator.image_format=jpeg")
    parser.add_argument("--ours", type=Path, default=ROOT,
                        help="the checkout of this project to run (default: this one), e.g. an export of an "
                             "earlier commit to measure a change")
    args = parser.parse_args()
    if not (args.peer / "caption_openai.py").is_file():
        parser.error(f"{args.peer} is not a vlm-caption checkout (no caption_openai.py)")
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    ideal = args.images * args.latency / args.slots
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        images = scratch / "images"
        kb = make_jpegs(images, args.images)
        print(f"{args.images} JPEGs 1024x768 ({kb:.0f} KB each), {args.slots} slots x {args.latency * 1000:.0f} ms, "
              f"concurrency {args.concurrency}, ideal {ideal:.2f} s; this project ({args.ours}) with "
              f"{args.set or 'its defaults'}")
        empty = scratch / "empty"
        empty.mkdir()
        runners = _runners(args, scratch)
        startup = {name: run(empty, FastServer(args.latency, args.slots).start()) for name, run in runners.items()}
        print(f"start and exit with no image: ours {startup['ours'].wall:.2f} s wall, {startup['ours'].cpu:.2f} s CPU; "
              f"vlm-caption {startup['peer'].wall:.2f} s, {startup['peer'].cpu:.2f} s CPU")
        results = {"ours": [], "peer": []}
        for pair in range(args.pairs):
            order = ["ours", "peer"] if pair % 2 == 0 else ["peer", "ours"]
            for name in order:
                outcome = runners[name](images, FastServer(args.latency, args.slots).start())
                results[name].append(outcome)
                print(f"pair {pair + 1} {name:4}: exit {outcome.exit_code}, {outcome.requests} requests, wall "
                      f"{outcome.wall:.2f} s ({outcome.wall / ideal:.2f}x ideal), client CPU {outcome.cpu:.2f} s "
                      f"({outcome.cpu / max(1, outcome.requests) * 1000:.2f} ms per request, "
                      f"{(outcome.cpu - startup[name].cpu) / max(1, outcome.requests) * 1000:.2f} ms without start-up)")
            ours, peer = results["ours"][-1], results["peer"][-1]
            print(f"pair {pair + 1}: vlm-caption / ours = {peer.wall / ours.wall:.2f}")
    _summary(results, startup, ideal)


def _runners(args, scratch: Path) -> dict:
    return {"ours": lambda images, server: run_ours(images, scratch, server, args.concurrency, args.set, args.ours),
            "peer": lambda images, server: run_peer(images, scratch, server, args.concurrency, args.peer,
                                                    args.peer_python)}


def _summary(results: dict, startup: dict, ideal: float) -> None:
    ours, peer = results["ours"], results["peer"]
    ratios = [p.wall / o.wall for o, p in zip(ours, peer)]
    for name, runs in results.items():
        walls = [run.wall for run in runs]
        per_request = [(run.cpu - startup[name].cpu) / max(1, run.requests) * 1000 for run in runs]
        print(f"{name:4}: median wall {statistics.median(walls):.2f} s ({statistics.median(walls) / ideal:.2f}x ideal),"
              f" range {min(walls):.2f}-{max(walls):.2f}; median client CPU per request without start-up "
              f"{statistics.median(per_request):.2f} ms, with it "
              f"{statistics.median(run.cpu / max(1, run.requests) * 1000 for run in runs):.2f} ms")
    print(f"vlm-caption / ours: median of {len(ratios)} pairs {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")


if __name__ == "__main__":
    main()
