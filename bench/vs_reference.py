"""Three stages against the hand-written reference client (not part of the test suite).

Generates images with tags (bench/throughput.py's), then runs in pairs, in alternating
order, caption.py with all three stages (tag summaries from the tests' fake Danbooru,
the vision model, the caption) and bench/reference_client.py, which sends the same
requests scheduled as well as they can be, on the same loopback LLM server at the same
concurrency. The caption.py run does more (Danbooru lookups, guards, records, fsynced
writes); at realistic latencies none of it should show in the wall time.

    python bench/vs_reference.py --images 400 --slots 32 --latency 0.8 --pairs 3
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

from fake_servers import FakeDanbooru  # noqa: E402
from fast_server import FastServer  # noqa: E402
from throughput import TAG_POOL, make_images, write_config  # noqa: E402
from vs_peer import timed  # noqa: E402


def run_ours(folder: Path, scratch: Path, latency: float, slots: int, concurrency: int) -> tuple:
    wiki = {f"tag_{n}": f"Tag number {n}, a [[thing]]." for n in range(TAG_POOL)}
    danbooru = FakeDanbooru(wiki=wiki).start()
    server = FastServer(latency, slots).start()
    try:
        cache = scratch / "tags_cache.json"
        cache.unlink(missing_ok=True)
        config = write_config(scratch / "config.json", server.base_url, danbooru.url, concurrency,
                              interrogator={"skip": False},
                              interpreter={"prompt_template": "templates/interpreter_prompt_template_short.txt"})
        for caption in folder.glob("*.caption"):
            caption.unlink()
        wall, cpu, code, _ = timed([sys.executable, str(ROOT / "caption.py"), str(folder), "--config", str(config),
                                    "--no-progress"], ROOT)
    finally:
        danbooru.stop()
    return wall, cpu, code, server.stop()["requests"]


def run_reference(folder: Path, latency: float, slots: int, concurrency: int) -> tuple:
    server = FastServer(latency, slots).start()
    wall, cpu, code, _ = timed([sys.executable, str(ROOT / "bench" / "reference_client.py"), str(folder),
                                server.base_url, str(concurrency)], ROOT)
    return wall, cpu, code, server.stop()["requests"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.8, help="seconds per request")
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    walls = {"ours": [], "reference": []}
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        folder = scratch / "images"
        make_images(folder, args.images)
        for pair in range(args.pairs):
            for name in (["ours", "reference"] if pair % 2 == 0 else ["reference", "ours"]):
                wall, cpu, code, requests = (run_ours(folder, scratch, args.latency, args.slots, args.concurrency)
                                             if name == "ours" else
                                             run_reference(folder, args.latency, args.slots, args.concurrency))
                ideal = requests * args.latency / args.slots
                walls[name].append(wall)
                print(f"pair {pair + 1} {name:9}: exit {code}, {requests} requests, wall {wall:.2f} s "
                      f"({wall / ideal:.3f}x ideal {ideal:.2f} s), client CPU {cpu:.2f} s "
                      f"({cpu / max(1, requests) * 1000:.2f} ms per request)")
            print(f"pair {pair + 1}: ours / reference = {walls['ours'][-1] / walls['reference'][-1]:.3f}")
    ratios = [ours / reference for ours, reference in zip(walls["ours"], walls["reference"])]
    print(f"median wall: ours {statistics.median(walls['ours']):.2f} s, reference "
          f"{statistics.median(walls['reference']):.2f} s; ours / reference: median of {len(ratios)} pairs "
          f"{statistics.median(ratios):.3f} (range {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
