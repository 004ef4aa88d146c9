"""Client CPU per chat request of the two transports (not a test).

Sends `--requests` POSTs of a `--kb` KB body (a vision request's size) at `--concurrency` to
bench/fast_server.py (its own process), once through the built-in HTTP/1.1 client
(tagcaption/http1.py, `transport: auto`) and once through an httpx2 client as `transport: httpx`
uses it, in alternating order, and prints each run's client CPU from getrusage (the server's
time excluded) per request. The bodies are made once, outside the measurement.

    python bench/transport.py --requests 800 --kb 380 --concurrency 32 --pairs 3
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import httpx2  # noqa: E402

from fast_server import FastServer  # noqa: E402
from tagcaption.http1 import Pool  # noqa: E402

HEADERS = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}


async def send_all(transport: str, url: str, body: bytes, requests: int, concurrency: int) -> None:
    target = httpx2.URL(url)
    client = httpx2.AsyncClient(trust_env=False, limits=httpx2.Limits(max_connections=1000,
                                                                     max_keepalive_connections=100))
    pool = Pool(target, 60, client) if transport == "http1" else None
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            response = await pool.post(target, HEADERS, body) if pool else \
                await client.send(client.build_request("POST", target, content=body, headers=HEADERS), stream=True)
            async for _ in response.aiter_bytes():
                pass
            await response.aclose()
    try:
        await asyncio.gather(*(one() for _ in range(requests)))
    finally:
        if pool:
            await pool.aclose()
        await client.aclose()


def measure(transport: str, body: bytes, args) -> float:
    server = FastServer(args.latency, args.concurrency).start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    asyncio.run(send_all(transport, server.base_url + "/chat/completions", body, args.requests, args.concurrency))
    after = resource.getrusage(resource.RUSAGE_SELF)
    served = server.stop()["requests"]
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    print(f"{transport:5}: {served} requests in {time.monotonic() - started:.2f} s, client CPU {cpu:.2f} s, "
          f"{cpu / args.requests * 1000:.2f} ms per request")
    return cpu / args.requests * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--kb", type=int, default=380)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args()
    body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + "A" * (args.kb * 1024)}}]}]}).encode()
    results = {"http1": [], "httpx": []}
    for pair in range(args.pairs):
        for transport in (("http1", "httpx") if pair % 2 == 0 else ("httpx", "http1")):
            results[transport].append(measure(transport, body, args))
    ours, theirs = statistics.median(results["http1"]), statistics.median(results["httpx"])
    print(f"median client CPU per request: http1 {ours:.2f} ms, httpx2 {theirs:.2f} ms ({theirs / ours:.1f}x)")


if __name__ == "__main__":
    main()
