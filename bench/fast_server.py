"""A lean asyncio OpenAI-compatible server for the throughput benchmark.

The test suite's threaded fake server is built to inject faults, not for speed: at a few
hundred requests a second its own CPU would be what the benchmark measures. This one
answers `/v1/models` and `/v1/chat/completions` (JSON or server-sent events) from a
single event loop, holds each request `latency` seconds within `slots` parallel slots
like a GPU server, and runs in its own process so it does not share the client's core.
"""
from __future__ import annotations

import asyncio
import json
import multiprocessing
import time

REPLY = "A short caption of the picture."


class FastServer:
    def __init__(self, latency: float, slots: int):
        self.latency, self.slots = latency, slots
        self._ready = multiprocessing.Queue()
        self._stats = multiprocessing.Queue()
        self._stop = multiprocessing.Event()
        self.process = multiprocessing.Process(target=self._serve, daemon=True)
        self.port = 0
        self.stats: dict = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> "FastServer":
        self.process.start()
        self.port = self._ready.get(timeout=10)
        return self

    def stop(self) -> dict:
        self._stop.set()
        self.stats = self._stats.get(timeout=10)
        self.process.join(timeout=10)
        return self.stats

    def _serve(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self.gate = asyncio.Semaphore(self.slots)
        self.requests = self.in_flight = self.max_in_flight = 0
        self.slot_seconds = 0.0
        self.first = self.last = None
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self._ready.put(server.sockets[0].getsockname()[1])
        while not self._stop.is_set():
            await asyncio.sleep(0.05)
        server.close()
        span = (self.last - self.first) if self.first is not None else 0.0
        self._stats.put({"requests": self.requests, "max_in_flight": self.max_in_flight, "busy_seconds": span,
                         "first": self.first, "last": self.last,
                         "average_in_flight": self.slot_seconds / span if span else 0.0})

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length", 0) or 0))
                await self._respond(writer, method, path, json.loads(body) if body else None)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _respond(self, writer, method: str, path: str, request) -> None:
        if path.endswith("/models"):
            self._send(writer, 200, {"object": "list", "data": [{"id": "m", "object": "model"}]})
            return
        self.requests += 1
        async with self.gate:
            started = time.monotonic()
            self.first = started if self.first is None else self.first
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            await asyncio.sleep(self.latency)
            self.in_flight -= 1
            self.last = time.monotonic()
            self.slot_seconds += self.last - started
        usage = {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108}
        if not request.get("stream"):
            self._send(writer, 200, {"id": "c", "object": "chat.completion", "model": "m", "usage": usage,
                                     "choices": [{"index": 0, "finish_reason": "stop",
                                                  "message": {"role": "assistant", "content": REPLY}}]})
            return
        events = [{"choices": [{"index": 0, "delta": {"role": "assistant", "content": REPLY}}]},
                  {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
                  {"choices": [], "usage": usage}]
        payload = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"
        self._send(writer, 200, payload, "text/event-stream")

    @staticmethod
    def _send(writer, status: int, body, content_type: str = "application/json") -> None:
        data = (json.dumps(body) if not isinstance(body, str) else body).encode()
        writer.write(f"HTTP/1.1 {status} OK\r\nContent-Type: {content_type}\r\nContent-Length: {len(data)}\r\n"
                     f"Connection: keep-alive\r\n\r\n".encode() + data)
