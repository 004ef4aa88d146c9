"""A small HTTP/1.1 client for chat requests to plain `http://` servers.

Local servers (llama.cpp, LM Studio, Ollama, vLLM on this machine or the LAN) are where a
client's own CPU shows: at 100 ms a reply and 32 slots, httpx2's stack (httpcore2, h11,
anyio) costs about 0.7 ms of CPU per request, this about 0.2 ms (bench/transport.py). It does only
what a chat request needs: one POST on a kept-alive connection, a reply framed by
Content-Length, chunked or by the connection closing, gzip or deflate undone. Anything else
goes to httpx2: `https://` (TLS), a proxy from the environment (`Replica` decides), and a
redirect: the request is sent again from the start through httpx2, so that its rules for
redirects apply (no Authorization to another origin, 301/302/303 turned into a GET, a bound
on the hops). That costs one more request to the server, only when it redirects.

Its failures are httpx2's exception types, so `replies.classify` and the retry policy treat
both transports alike; `endpoints.<name>.transport: httpx` turns it off.
"""
from __future__ import annotations

import asyncio
import re
import zlib
from typing import AsyncIterator, Dict, Iterator, List, Optional, Union

import httpx2

from tagcaption.sinks import shorten

MAX_HEAD = 64 * 1024
"""Bytes of status line and headers at most."""
REDIRECTS = (301, 302, 303, 307, 308)
READ_SIZE = 256 * 1024
INFLATE_STEP = 64 * 1024
"""Bytes a compressed body is undone by at a time."""
HEAD_END = re.compile(rb"\n\r?\n")
"""The blank line after the headers: CRLF CRLF, or bare LFs."""
CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]{1,16}")
"""A chunk's size: hex digits only (`int(_, 16)` also takes a sign, `0x`, `_` and spaces)."""
MAX_INTERIM = 16
"""Interim (1xx) answers at most before the reply."""


class _Connection(asyncio.Protocol):
    """One TCP connection: what has arrived, and a way to wait for more within a deadline."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.transport: Optional[asyncio.Transport] = None
        self.buffer = bytearray()
        self.received = 0
        """Bytes arrived in all."""
        self.closed = False
        self.idle = False
        """In the pool, between requests: whatever the server sends now ends the connection."""
        self._waiter: Optional[asyncio.Future] = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=16 * 1024 * 1024)  # a body is handed over whole

    def data_received(self, data: bytes) -> None:
        if self.idle:  # unasked: not kept, however much more of it the server would send
            self.close()
            return
        self.buffer += data
        self.received += len(data)
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def reusable(self) -> bool:
        """Idle and still open: the server has neither closed it nor sent anything unasked."""
        return not self.closed and not self.buffer and not self.transport.is_closing()

    async def more(self, timeout: float) -> None:
        """Wait until more bytes arrive or the connection closes; ReadTimeout after `timeout`."""
        if self.closed:
            raise httpx2.RemoteProtocolError("the server closed the connection before the reply ended")
        waiter = self._waiter = self.loop.create_future()
        timer = self.loop.call_later(timeout, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def head(self, timeout: float) -> bytes:
        """The status line and headers, without the blank line ending them (lines may end
        with a bare LF, as httpx2 takes them too)."""
        searched = 0
        while True:
            end = HEAD_END.search(self.buffer, max(0, searched - 2))
            if end and end.start() <= MAX_HEAD:
                head = bytes(self.buffer[:end.start()])
                del self.buffer[:end.end()]
                return head
            if len(self.buffer) > MAX_HEAD:
                raise httpx2.RemoteProtocolError(f"reply headers longer than {MAX_HEAD // 1024} KB")
            searched = len(self.buffer)
            await self.more(timeout)

    async def take(self, most: int, timeout: float) -> bytes:
        """Up to `most` bytes, at least one (so a loop over it always moves on)."""
        if most < 1:
            raise ValueError(f"take({most}): at least one byte must be asked for")
        while not self.buffer:
            await self.more(timeout)
        piece = bytes(self.buffer[:most])
        del self.buffer[:most]
        return piece

    async def line(self, timeout: float) -> bytes:
        """A line of chunked framing, without the CRLF (or bare LF) ending it."""
        while True:
            end = self.buffer.find(b"\n")
            if end >= 0:
                line = bytes(self.buffer[:end - 1 if end and self.buffer[end - 1] == 13 else end])
                del self.buffer[:end + 1]
                return line
            if len(self.buffer) > MAX_HEAD:
                raise httpx2.RemoteProtocolError("a chunk header longer than 64 KB")
            await self.more(timeout)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _expire(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_exception(httpx2.ReadTimeout("timed out waiting for the reply"))


class Response:
    """What `wire.py` reads of a reply: the same names as httpx2's Response."""

    def __init__(self, pool: "Pool", connection: _Connection, head: bytes):
        self._pool, self._connection = pool, connection
        status_line, *lines = (line.rstrip("\r") for line in head.decode("latin-1").split("\n"))
        version, _, rest = status_line.partition(" ")
        code, _, self.reason_phrase = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not _digits(code) or len(code) != 3:
            raise httpx2.RemoteProtocolError(f"not an HTTP reply: {shorten(status_line, 80)!r}")
        self.status_code = int(code)
        self.headers: Dict[str, str] = {}
        for line in lines:
            name, colon, value = line.partition(":")
            if not colon:
                raise httpx2.RemoteProtocolError(f"malformed reply header: {shorten(line, 80)!r}")
            name = name.strip().lower()
            self.headers[name] = f"{self.headers[name]}, {value.strip()}" if name in self.headers else value.strip()
        length = self.headers.get("content-length")
        if length is not None and not _digits(length):  # read by wire.py too, before the body
            raise httpx2.RemoteProtocolError(f"malformed Content-Length: {shorten(length, 40)!r}")
        self._keep = version == "HTTP/1.1" and "close" not in self.headers.get("connection", "").lower()
        self._done = False

    @property
    def interim(self) -> bool:
        return 100 <= self.status_code < 200

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        decoder = _decoder(self.headers.get("content-encoding", ""))
        if decoder is None:
            async for piece in self._body():
                yield piece
            return
        try:
            async for piece in self._body():
                for data in _inflated(decoder, piece):
                    yield data
            rest = decoder.flush()
        except zlib.error as exc:
            raise httpx2.DecodingError(f"the reply's Content-Encoding could not be undone ({exc})") from None
        if rest:
            yield rest

    async def _body(self) -> AsyncIterator[bytes]:
        timeout, connection = self._pool.timeout, self._connection
        if self.status_code in (204, 304):
            self._done = True
            return
        if "chunked" in self.headers.get("transfer-encoding", "").lower():
            async for piece in _chunks(connection, timeout):
                yield piece
        elif "content-length" in self.headers:
            left = int(self.headers["content-length"])
            while left:
                piece = await connection.take(min(left, READ_SIZE), timeout)
                left -= len(piece)
                yield piece
        else:
            self._keep = False
            while connection.buffer or not connection.closed:
                if not connection.buffer:
                    await connection.more(timeout)
                    continue
                piece = bytes(connection.buffer)
                connection.buffer.clear()
                yield piece
        self._done = True

    async def aclose(self) -> None:
        if self._done and self._keep and not self._connection.buffer:
            self._pool.give_back(self._connection)
        else:
            self._connection.close()


async def _chunks(connection: _Connection, timeout: float) -> AsyncIterator[bytes]:
    while True:
        size_text = (await connection.line(timeout)).split(b";", 1)[0].strip(b" \t")
        if not CHUNK_SIZE.fullmatch(size_text):
            raise httpx2.RemoteProtocolError(f"malformed chunk size: {size_text[:20]!r}")
        left = int(size_text, 16)
        if left == 0:
            trailers = 0
            while True:  # trailers, up to the blank line
                line = await connection.line(timeout)
                trailers += len(line) + 2
                if not line:
                    return
                if trailers > MAX_HEAD:
                    raise httpx2.RemoteProtocolError(f"reply trailers longer than {MAX_HEAD // 1024} KB")
        while left:
            piece = await connection.take(min(left, READ_SIZE), timeout)
            left -= len(piece)
            yield piece
        if await connection.line(timeout):
            raise httpx2.RemoteProtocolError("a chunk longer than its size")


def _inflated(decoder, piece: bytes) -> Iterator[bytes]:
    """`piece` undone in steps of INFLATE_STEP bytes at most, so that wire.py's max_reply_bytes
    stops a small body that inflates to gigabytes (a "zip bomb") before it is all in memory."""
    while piece and not decoder.eof:  # after the end, the rest is dropped (zlib would keep it all)
        data = decoder.decompress(piece, INFLATE_STEP)
        if data:
            yield data
        elif len(decoder.unconsumed_tail) >= len(piece):  # never the case: zlib takes or gives
            raise zlib.error("no progress")
        piece = decoder.unconsumed_tail


def _digits(text: str) -> bool:
    """ASCII digits only: `str.isdigit` also takes '²', which `int` refuses."""
    return text.isascii() and text.isdigit()


def _decoder(encoding: str):
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return None
    if encoding in ("gzip", "x-gzip"):
        return zlib.decompressobj(16 + zlib.MAX_WBITS)
    if encoding == "deflate":
        return zlib.decompressobj()
    raise httpx2.DecodingError(f"unsupported Content-Encoding {encoding!r}")


class Pool:
    """Kept-alive connections to one `http://` server, for its chat requests; `fallback` is
    the replica's httpx2 client, which sends again from the start any request that was redirected."""

    def __init__(self, url: httpx2.URL, timeout: float, fallback: httpx2.AsyncClient):
        self.host, self.port = url.host, url.port or 80
        self.authority = url.netloc.decode("ascii")
        self.timeout = timeout
        self.fallback = fallback
        self._idle: List[_Connection] = []

    async def post(self, url: httpx2.URL, headers: Dict[str, str], body: bytes) -> Union[Response, httpx2.Response]:
        head = "".join([f"POST {url.raw_path.decode('ascii')} HTTP/1.1\r\nHost: {self.authority}\r\n",
                        *(f"{name}: {value}\r\n" for name, value in headers.items()),
                        f"Content-Length: {len(body)}\r\n\r\n"]).encode("latin-1")
        for last_try in (False, True):
            connection, reused = await self._connection()
            before = connection.received
            try:
                response = await self._send(connection, head, body)
            except (httpx2.RemoteProtocolError, httpx2.ReadError) as exc:
                connection.close()
                if reused and not last_try and connection.received == before:
                    continue  # an idle connection the server had just closed, unheard: once more, on a new one
                raise exc
            except BaseException:
                connection.close()
                raise
            if response.status_code in REDIRECTS and response.headers.get("location"):
                await response.aclose()  # httpx2 asks again and follows with its own rules (see above)
                return await self.fallback.send(self.fallback.build_request("POST", url, content=body,
                                                                            headers=headers), stream=True)
            return response
        raise AssertionError("unreachable")

    async def _send(self, connection: _Connection, head: bytes, body: bytes) -> Response:
        connection.transport.writelines((head, body))
        for _ in range(MAX_INTERIM + 1):
            response = Response(self, connection, await connection.head(self.timeout))
            if not response.interim:
                return response
        raise httpx2.RemoteProtocolError(f"more than {MAX_INTERIM} interim (1xx) answers")

    async def _connection(self):
        while self._idle:
            connection = self._idle.pop()
            connection.idle = False
            if connection.reusable():
                return connection, True
            connection.close()
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(loop), self.host, self.port), self.timeout)
        except asyncio.TimeoutError:
            raise httpx2.ConnectTimeout(f"no connection to {self.authority} within {self.timeout:g} s") from None
        except OSError as exc:
            raise httpx2.ConnectError(f"{exc.strerror or exc} ({self.authority})") from None
        return connection, False

    def give_back(self, connection: _Connection) -> None:
        connection.idle = True
        self._idle.append(connection)

    async def aclose(self) -> None:
        for connection in self._idle:
            connection.close()
        self._idle.clear()
