"""How long a large Danbooru dump takes to load, and how much memory it holds (not a test).

    python tests/measure_dump_load.py [--pages 190000] [--tags 1200000] [--format parquet|csv|csv.gz|ndjson.gz]

Writes a synthetic dump shaped like danbooru_wikis_full (wiki_pages, tags, tag_aliases,
tag_implications; bodies of DText with Danbooru-like lengths, a third of pages with other
names) into a temporary folder, then loads it with `FileSource` in a fresh process and prints
the wall time and the peak resident memory above the interpreter's baseline. Nothing is
downloaded.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = [f"{a}{b}" for a in ("ka", "mi", "to", "ra", "shi", "ne", "yu", "ha", "so", "ri", "ko", "ta")
         for b in ("", "n", "ru", "ki", "ro", "na", "me", "sa", "to", "ya")]


def body(rng: random.Random) -> str:
    length = min(40_000, int(rng.lognormvariate(5.8, 1.0)))  # median ~330 characters, mean ~550
    words, size = [], 0
    while size < length:
        words.append(rng.choice(WORDS) if rng.random() > 0.1 else f"[[{rng.choice(WORDS)}_{rng.choice(WORDS)}]]")
        size += len(words[-1]) + 1
    japanese = " (初音ミク)" if rng.random() < 0.3 else ""  # many real pages quote a Japanese name
    return "h4. About\n" + " ".join(words) + japanese + "\n\nh4. See also\n* [[" + rng.choice(WORDS) + "]]"


def write(folder: Path, pages: int, tags: int, kind: str) -> None:
    rng = random.Random(17)
    titles = [f"{rng.choice(WORDS)}_{rng.choice(WORDS)}_{n}" for n in range(pages)]
    tables = {
        "wiki_pages": [{"id": n, "title": title, "body": body(rng), "is_deleted": rng.random() < 0.02,
                        "other_names": ["初音ミク", title.title()] if rng.random() < 0.33 else []}
                       for n, title in enumerate(titles)],
        "tags": [{"id": n, "name": titles[n] if n < pages else f"tag_{n}", "category": rng.choice([0, 0, 0, 1, 3, 4, 5]),
                  "post_count": int(rng.expovariate(1 / 300))} for n in range(tags)],
        "tag_aliases": [{"id": n, "antecedent_name": f"alias_{n}", "consequent_name": rng.choice(titles),
                         "status": "active"} for n in range(45_000)],
        "tag_implications": [{"id": n, "antecedent_name": rng.choice(titles), "consequent_name": rng.choice(titles),
                              "status": "active" if rng.random() < 0.9 else "deleted"} for n in range(35_000)],
    }
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    from test_tag_dumps import write_table  # the tests' writer: the same shapes as the tests read

    for name, rows in tables.items():
        write_table(folder / f"{name}.{kind}", rows)


LOAD = """
import json, sys, time
sys.path.insert(0, {root!r})
from tagcaption.config import Config, TagProviderConfig
from tagcaption.offline import FileSource
import pyarrow, pyarrow.parquet  # the program imports it to look for parquet files when it is installed

def memory(field="VmHWM"):  # peak (or, VmRSS, current) resident memory in MB; ru_maxrss survives exec
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024

base = memory()
started = time.monotonic()
source = FileSource(Config(tag_provider=TagProviderConfig(source="file", dump_dir={folder!r})))
seconds = time.monotonic() - started
pyarrow.default_memory_pool().release_unused()
print(json.dumps({{"seconds": seconds, "base_mb": base, "peak_mb": memory(), "held_mb": memory("VmRSS"),
                  "text_mb": sum(map(len, source.pages.values())) / 1e6, "loaded": source.loaded}}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pages", type=int, default=190_000)
    parser.add_argument("--tags", type=int, default=1_200_000)
    parser.add_argument("--format", default="parquet", choices=["parquet", "csv", "csv.gz", "ndjson.gz"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        started = time.monotonic()
        write(Path(folder), args.pages, args.tags, args.format)
        size = sum(path.stat().st_size for path in Path(folder).iterdir()) / 1e6
        print(f"wrote {args.pages:,} pages and {args.tags:,} tags as {args.format} ({size:.0f} MB) "
              f"in {time.monotonic() - started:.0f} s")
        result = json.loads(subprocess.run([sys.executable, "-c", LOAD.format(root=str(ROOT), folder=folder)],
                                           capture_output=True, text=True, check=True).stdout)
        print(f"loaded {result['loaded']} ({result['text_mb']:.0f} MB of wiki text); peak memory "
              f"{result['peak_mb']:.0f} MB, {result['held_mb']:.0f} MB held after loading (the interpreter and "
              f"the program's imports: {result['base_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
