"""Single asks about one tag each, gathered into batches for a source that answers many
names in one request (Danbooru: up to `danbooru_batch_size`).

While every request slot is busy, asks pile up into the next batch, so U tags cost about
U / batch size requests; a batch that is not full waits `wait` seconds for the tags of the
images read just after, and a full one leaves at once.
"""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Dict, Generic, List, Optional, TypeVar

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(self, fetch: Callable[[List[str]], Awaitable[Dict[str, T]]], size: int,
                 slots: asyncio.Semaphore, wait: float, missing: Callable[[str], T]):
        """`fetch` answers a batch of names; `missing(name)` stands for a name it left out.
        Batchers that share `slots` share the requests in flight."""
        self.fetch, self.size, self.slots, self.wait, self.missing = fetch, size, slots, wait, missing
        self._waiting: Dict[str, asyncio.Future] = {}
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._dispatcher: Optional[asyncio.Task] = None
        self._running: set = set()

    async def get(self, name: str) -> T:
        """The answer about `name`; the exception of its batch's request if that failed."""
        future = self._waiting.get(name)
        if future is None:
            future = self._waiting[name] = asyncio.get_running_loop().create_future()
            self._wake.set()
            if len(self._waiting) >= self.size:
                self._full.set()
            if self._dispatcher is None:
                self._dispatcher = asyncio.create_task(self._dispatch())
        # Shielded: two asks may share one future; cancelling one must not cancel the other.
        return await asyncio.shield(future)

    async def _dispatch(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                await self.slots.acquire()
                await self._until_full()
                names = list(self._waiting)[: self.size]
                batch = {name: self._waiting.pop(name) for name in names}
                task = asyncio.create_task(self._run(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)

    async def _until_full(self) -> None:
        if len(self._waiting) < self.size:
            try:
                await asyncio.wait_for(self._full.wait(), self.wait)
            except asyncio.TimeoutError:
                pass
        self._full.clear()

    async def _run(self, batch: Dict[str, asyncio.Future]) -> None:
        try:
            found = await self.fetch(list(batch))
        except Exception as exc:  # handed to every name of the batch, each asker decides
            for future in batch.values():
                if not future.done():
                    future.set_exception(exc)
        else:
            for name, future in batch.items():
                if not future.done():
                    future.set_result(found[name] if name in found else self.missing(name))
        finally:
            self.slots.release()

    async def close(self) -> None:
        tasks = list(self._running) + ([self._dispatcher] if self._dispatcher else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for future in self._waiting.values():
            future.cancel()
