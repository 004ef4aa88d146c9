"""Every wait of a run has a bound, and this module holds them.

- Model servers: `endpoints.<name>.timeout` bounds connecting and each read,
  `request_timeout` a whole reply from when the request leaves (see wire.py);
  `list_models` at the start waits at most MODELS_SECONDS.
- Files: every file read runs off the event loop in a daemon thread through `off_loop`, so
  a read that stalls (a dead network share) fails its own image after `file_timeout`
  seconds (30) instead of holding up the run. A read stuck in the kernel keeps its thread,
  which is left behind, and the process can still exit.
- Stopping: after Ctrl-C or SIGTERM, the images in flight get `stop_grace` seconds (5), and
  so do the caption writes under way; a run that stopped early waits COUNT_SECONDS for the
  count of names, to say how many it left.
"""
from __future__ import annotations

import asyncio
import queue
import threading
from typing import Any, Callable, Optional, TypeVar

from tagcaption.errors import ImageProblem, Kind

T = TypeVar("T")

FILE_READ_SECONDS = 30.0
"""The default of the `file_timeout` key."""
MODELS_SECONDS = 10.0
COUNT_SECONDS = 3.0


class Stalled(ImageProblem):
    """A file operation did not finish within its deadline."""

    kind = Kind.TIMEOUT


class _Workers:
    """Daemon threads kept for `off_loop`: starting a thread waits until it runs, which
    under a busy GIL stalls the event loop for milliseconds, so each call reuses an idle
    one and only starts a new thread when none is idle (a read stuck for good keeps its
    thread and costs no other call its turn)."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            start = self._idle == 0
            if not start:
                self._idle -= 1
        self._jobs.put(job)
        if start:
            threading.Thread(target=self._serve, name="file-io", daemon=True).start()

    def _serve(self) -> None:
        while True:
            self._jobs.get()()
            with self._lock:
                self._idle += 1


_WORKERS = _Workers()


async def off_loop(function: Callable[..., T], *args: Any, seconds: Optional[float] = FILE_READ_SECONDS,
                   what: str = "") -> T:
    """`function(*args)` in a daemon thread; raises Stalled after `seconds` (None: no bound)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future = loop.create_future()

    def settle(result: Any, error: Optional[BaseException]) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:  # handed to the awaiting task, whatever it is
            result, error = None, exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:  # the run is over and its loop closed
            pass

    _WORKERS.submit(work)
    try:
        return await asyncio.wait_for(future, seconds)
    except asyncio.TimeoutError:
        raise Stalled(f"{what or 'a file operation'} did not finish within {seconds:g} s "
                      "(a stalled network share, or a special file)") from None
