"""Throughput and memory benchmark (not part of the test suite).

Starts loopback servers — bench/fast_server.py as the LLM server, with a set latency and
number of parallel slots, and the tests' fake Danbooru — generates images with tags,
runs `caption.py` on them in a child process, and prints the wall time against the ideal
time (requests x latency / slots), requests per stage, how many requests the server had
in flight on average, and the child's peak memory and CPU time. Also times image
preparation on 24-megapixel files. Nothing leaves 127.0.0.1.

    python bench/throughput.py                      # every scenario, default sizes
    python bench/throughput.py --scenario three-stages --images 2000 --slots 32 --latency 0.1
    python bench/throughput.py --scenario tags-memory --images 5000 50000
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from PIL import Image, ImageFilter  # noqa: E402

from fake_servers import FakeDanbooru  # noqa: E402
from fast_server import FastServer  # noqa: E402

TAG_POOL = 200


def make_images(folder: Path, count: int, tags_per_image: int = 6, with_captions: bool = False) -> None:
    """`count` small PNGs (hard links to one file: decoding is not what is measured here) with
    tag files drawing on a pool of TAG_POOL distinct tags."""
    folder.mkdir(parents=True, exist_ok=True)
    template = folder.parent / "template.png"
    Image.new("RGB", (64, 48), (120, 90, 200)).save(template)
    for n in range(count):
        os.link(template, folder / f"{n:06}.png")
        (folder / f"{n:06}.txt").write_text(", ".join(f"tag_{(n * 7 + k * 13) % TAG_POOL}"
                                                      for k in range(tags_per_image)))
        if with_captions:
            (folder / f"{n:06}.caption").write_text("An existing caption.")


def write_config(path: Path, llm_urls, danbooru_url: str, concurrency: int, **stages) -> Path:
    config = {
        "endpoints": {"default": {"base_url": llm_urls, "concurrency": concurrency, "max_retries": 2,
                                  "timeout": 60}},
        "tag_provider": {"model": "m", "danbooru_url": danbooru_url, "danbooru_rate": 1000,
                         "cache_file": str(path.parent / "tags_cache.json")},
        "interrogator": {"model": "m", "skip": True},
        "interpreter": {"model": "m"},
        "output": {"extension": ".caption"},
    }
    for stage, values in stages.items():
        config[stage].update(values)
    path.write_text(json.dumps(config))
    return path


@dataclass
class Outcome:
    started: float
    seconds: float
    peak_mb: float
    cpu_seconds: float
    exit_code: int
    summary: str
    system_seconds: float = 0.0

    @property
    def per_stage(self) -> dict:
        return {stage: int(count) for stage, count in
                re.findall(r"(tag_provider|interrogator|interpreter):\s+(\d+) requests", self.summary)}


OVERRIDES: list = []
"""KEY=VALUE config overrides given with --set, passed to every caption.py run."""


def run_caption(images: Path, config: Path) -> Outcome:
    """caption.py in a child process, timed, with its own peak memory and CPU time."""
    started = time.monotonic()
    child = subprocess.Popen([sys.executable, str(ROOT / "caption.py"), str(images), "--config", str(config),
                              "--no-progress", *OVERRIDES], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             cwd=ROOT)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    return Outcome(started, time.monotonic() - started, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime,
                   os.waitstatus_to_exitcode(status), out, usage.ru_stime)


def scenario(count: int, latency: float, slots: int, replicas: int = 1, captions: bool = False,
             concurrency: Optional[int] = None, **stages):
    wiki = {f"tag_{n}": f"Tag number {n}, a [[thing]]." for n in range(TAG_POOL)}
    danbooru = FakeDanbooru(wiki=wiki).start()
    llms = [FastServer(latency, slots).start() for _ in range(replicas)]
    try:
        with tempfile.TemporaryDirectory() as scratch:
            folder = Path(scratch) / "images"
            make_images(folder, count, with_captions=captions)
            config = write_config(Path(scratch) / "config.json", [llm.base_url for llm in llms], danbooru.url,
                                  concurrency or slots, **stages)
            outcome = run_caption(folder, config)
    finally:
        danbooru.stop()
        stats = [llm.stop() for llm in llms]
    return outcome, stats, len(danbooru.requests)


def three_stages(count: int, latency: float, slots: int, concurrency: int) -> float:
    """`concurrency` is the client's setting; above `slots`, the server queues the extra
    requests. Returns wall time over ideal time."""
    outcome, (stats,), _ = scenario(count, latency, slots, concurrency=concurrency, interrogator={"skip": False},
                                    interpreter={"prompt_template": "templates/interpreter_prompt_template_short.txt"})
    ideal = stats["requests"] * latency / slots
    print(f"three stages: {count} images, {slots} slots, concurrency {concurrency}, {latency * 1000:.0f} ms/request: "
          f"exit {outcome.exit_code}, "
          f"{stats['requests']} requests {outcome.per_stage}, wall {outcome.seconds:.1f} s, ideal {ideal:.1f} s, "
          f"ratio {outcome.seconds / ideal:.2f}; first to last request {stats['busy_seconds']:.1f} s "
          f"(ratio {stats['busy_seconds'] / ideal:.2f}), the first one {stats['first'] - outcome.started:.1f} s after "
          f"start, exit {outcome.started + outcome.seconds - stats['last']:.2f} s after the last reply; in flight {stats['average_in_flight']:.1f} on average "
          f"(max {stats['max_in_flight']}); client CPU {outcome.cpu_seconds:.1f} s ({outcome.system_seconds:.1f} s in the "
          f"kernel), peak RSS {outcome.peak_mb:.0f} MB")
    return outcome.seconds / ideal


def tags_memory(counts, latency: float, slots: int) -> None:
    peaks = []
    for count in counts:
        outcome, (stats,), _ = scenario(count, latency, slots)
        peaks.append(outcome.peak_mb)
        print(f"tags only: {count} images: exit {outcome.exit_code}, {stats['requests']} requests "
              f"{outcome.per_stage}, wall {outcome.seconds:.1f} s ({count / outcome.seconds:.0f} images/s), "
              f"peak RSS {outcome.peak_mb:.0f} MB")
    if len(peaks) > 1:
        print(f"tags only: peak RSS {100 * (peaks[-1] / peaks[0] - 1):+.0f}% from {counts[0]} to {counts[-1]} images")


def rerun(count: int) -> None:
    outcome, (stats,), danbooru_requests = scenario(count, 0.0, 8, captions=True)
    print(f"rerun over {count} captioned images: exit {outcome.exit_code}, {stats['requests']} chat requests, "
          f"{danbooru_requests} Danbooru requests, wall {outcome.seconds:.2f} s, peak RSS {outcome.peak_mb:.0f} MB")


def replicas(count: int, latency: float, slots: int) -> None:
    """Throughput while serving: images over the servers' busy time (start-up excluded)."""
    rates = []
    for replica_count in (1, 2):
        outcome, stats, _ = scenario(count, latency, slots, replicas=replica_count, tag_provider={"skip": True})
        busy = max(s["busy_seconds"] for s in stats)
        rates.append(count / busy)
        print(f"replicas: {replica_count} x {slots} slots, {latency * 1000:.0f} ms/request, {count} images: "
              f"exit {outcome.exit_code}, wall {outcome.seconds:.1f} s, serving {busy:.1f} s, "
              f"{rates[-1]:.1f} images/s, requests per replica {[s['requests'] for s in stats]}")
    print(f"replicas: two give {rates[1] / rates[0]:.2f}x the throughput of one")


def preparation(repeats: int = 7) -> None:
    from tagcaption.images import ImageOptions, prepare_image

    with tempfile.TemporaryDirectory() as scratch:
        photo = Image.radial_gradient("L").resize((6000, 4000)).convert("RGB")
        noise = Image.effect_noise((6000, 4000), 40).convert("RGB").filter(ImageFilter.GaussianBlur(2))
        photo = Image.blend(photo, noise, 0.5)
        for fmt, name in (("JPEG", "photo.jpg"), ("PNG", "photo.png")):
            path = Path(scratch) / name
            photo.save(path, fmt, quality=92) if fmt == "JPEG" else photo.save(path, fmt, compress_level=1)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                prepared = prepare_image(path, ImageOptions())
                times.append(time.perf_counter() - started)
            print(f"image preparation: 24 MP {fmt} ({path.stat().st_size / 1e6:.1f} MB) -> "
                  f"{prepared.width}x{prepared.height} JPEG: median {statistics.median(times) * 1000:.0f} ms on one "
                  f"core, payload {prepared.size_bytes / 1024:.0f} KB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", default="all",
                        choices=["all", "three-stages", "tags-memory", "rerun", "replicas", "prep"])
    parser.add_argument("--images", type=int, nargs="*", help="image counts (scenario defaults otherwise)")
    parser.add_argument("--latency", type=float, default=None, help="seconds per request")
    parser.add_argument("--slots", type=int, default=None, help="parallel slots per server")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run, e.g. --set endpoints.default.stream=false")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of three-stages per concurrency; the best and the median are printed, since a "
                             "shared host only ever makes a run slower")
    parser.add_argument("--concurrency", type=int, nargs="*",
                        help="the client's endpoint concurrency for three-stages (default: the slots, then the "
                             "slots + 1/8, as the README recommends)")
    args = parser.parse_args()
    OVERRIDES[:] = args.set
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")

    def pick(value, default):
        return default if value is None else value
    wanted = args.scenario
    if wanted in ("all", "three-stages"):
        slots = args.slots or 32
        for concurrency in args.concurrency or [slots, slots + max(1, slots // 8)]:
            ratios = sorted(three_stages((args.images or [2000])[0], pick(args.latency, 0.1), slots, concurrency)
                            for _ in range(args.repeat))
            if args.repeat > 1:
                print(f"three stages, concurrency {concurrency}: wall/ideal best {ratios[0]:.2f}, median "
                      f"{statistics.median(ratios):.2f} over {args.repeat} runs")
    if wanted in ("all", "rerun"):
        rerun((args.images or [10000])[0])
    if wanted in ("all", "replicas"):
        replicas((args.images or [1000])[0], pick(args.latency, 0.1), args.slots or 8)
    if wanted in ("all", "tags-memory"):
        tags_memory(args.images or [5000, 50000], pick(args.latency, 0.0), args.slots or 64)
    if wanted in ("all", "prep"):  # last: a child inherits this process's peak memory in its own
        preparation()


if __name__ == "__main__":
    main()
