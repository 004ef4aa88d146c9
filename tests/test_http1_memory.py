"""The built-in HTTP/1.1 transport (tagcaption/http1.py) holds little memory whatever a server
sends: a compressed body is undone in steps that max_reply_bytes can stop (a "zip bomb"),
bytes after the end of a compressed body are dropped, and bytes sent to an idle connection
end it. Each case measures the peak with tracemalloc, against test_http1's raw server."""
from __future__ import annotations

import gzip
import json
import tracemalloc
import zlib
from typing import Callable

import pytest

import test_http1
from test_http1 import COMPLETION, ask, reply
from tagcaption.errors import LLMError

raw_server = test_http1.raw_server


def peak_of(go: Callable[[], object]) -> tuple:
    """What `go()` returns or raises, and the most memory it held at once (in MB)."""
    tracemalloc.start()
    try:
        try:
            outcome = go()
        except LLMError as exc:
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1] / 2**20
    finally:
        tracemalloc.stop()


def _bomb(size: int, wbits: int = 16 + zlib.MAX_WBITS) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    block = bytes(1 << 20)
    return b"".join(packer.compress(block) for _ in range(size >> 20)) + packer.flush()


def test_a_gzip_bomb_is_refused_without_inflating_it(raw_server):
    bomb = _bomb(128 << 20)  # 128 MB of zeros in 125 KB: undone at once, 128 MB in memory
    server = raw_server(lambda n, head: (reply(bomb, "200 OK", "Content-Type: application/json",
                                               "Content-Encoding: gzip"), False))
    refused, peak = peak_of(lambda: ask(server.url, max_reply_bytes=1 << 20))
    assert "more than max_reply_bytes" in str(refused) and peak < 30, f"{peak:.0f} MB at the peak"


def test_bytes_after_the_end_of_a_gzip_body_are_dropped_not_kept(raw_server):
    junk, zipped = b"x" * (1 << 20), gzip.compress(json.dumps(COMPLETION).encode())
    wire = reply(b"", "200 OK", "Content-Encoding: gzip", "Transfer-Encoding: chunked") + \
        b"%x\r\n%s\r\n" % (len(zipped), zipped) + b"%x\r\n%s\r\n" % (len(junk), junk) * 24 + b"0\r\n\r\n"
    server = raw_server(lambda n, head: (wire, False))
    [(answer, _)], peak = peak_of(lambda: ask(server.url))
    assert answer.text == "A red square." and peak < 10, f"{peak:.0f} MB at the peak"


def test_bytes_the_server_sends_unasked_end_an_idle_connection_at_once(raw_server):
    junk = b"x" * (32 << 20)
    replies = {1: ([reply(json.dumps(COMPLETION).encode()), 0.05, junk], False),
               2: (reply(json.dumps(COMPLETION).encode()), False)}
    server = raw_server(lambda n, head: replies[n])
    answers, peak = peak_of(lambda: ask(server.url, times=2, pause=0.5))
    assert [reply.text for reply, _ in answers] == ["A red square."] * 2 and server.connections == 2
    assert peak < 10, f"{peak:.0f} MB at the peak"


@pytest.mark.parametrize("encoding, wbits", [("gzip", 16 + zlib.MAX_WBITS), ("deflate", zlib.MAX_WBITS)])
def test_a_big_compressed_reply_is_undone_in_steps(raw_server, encoding, wbits):
    text = "A red square. " * 40_000  # 560 KB, many steps of inflating
    completion = dict(COMPLETION, choices=[dict(COMPLETION["choices"][0], message={"role": "assistant",
                                                                                   "content": text})])
    packer = zlib.compressobj(9, zlib.DEFLATED, wbits)
    packed = packer.compress(json.dumps(completion).encode()) + packer.flush()
    server = raw_server(lambda n, head: (reply(packed, "200 OK", f"Content-Encoding: {encoding}"), False))
    [(answer, _)] = ask(server.url)
    assert answer.text == text
