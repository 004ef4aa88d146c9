"""One run: the selection of images → the captioner → the writer, in one direction.

The selection walks the folder as captioning goes; a producer reads each image's tags
(their lookups and summaries start then) and queues it up to LOOKAHEAD images ahead of a
bounded pool of workers; a worker takes one image through the captioner and the writer.
Each image fails alone: its failure is recorded and the batch goes on, unless the error
would repeat for every image (its type says so), which stops the run. Ctrl-C or SIGTERM
stops taking new images, gives those in flight `stop_grace` seconds, then saves what there is.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Dict, List, Optional

from tagcaption.captioner import Captioner
from tagcaption.config import Config
from tagcaption.deadlines import COUNT_SECONDS
from tagcaption.dry_run import format_preview
from tagcaption.errors import ImageProblem, InternalError
from tagcaption.deadlines import off_loop
from tagcaption.folder import Folder, unread_images
from tagcaption.layout import ImageItem, Layout
from tagcaption.plan import RunPlan
from tagcaption.progress import Progress
from tagcaption.selection import Selection, Shard
from tagcaption.sinks import redact
from tagcaption.stages import build_stages, check_servers
from tagcaption.state import Failure
from tagcaption.tally import Tally
from tagcaption.writer import Writer

log = logging.getLogger("caption")

LOOKAHEAD = 1000
"""Images read ahead of the workers: their tags' lookups and summaries start early, and
Danbooru gets full batches, while memory stays bounded however large the folder."""
ROW_LOOKAHEAD = 128
"""Dataset rows read ahead: each holds its image in memory, so far fewer than a folder's paths."""
MAX_MESSAGE = 1000
"""Characters of a failure message kept (a message may quote a whole broken input)."""


@dataclass(frozen=True)
class RunOptions:
    """How this run was asked for on the command line (the config says what to do)."""
    progress: Optional[bool] = None
    retry_failed: bool = False
    refresh_tags: bool = False
    debug_dir: Optional[Path] = None
    shard: Shard = Shard()
    dry_run: Optional[str] = None
    """None, "llm" (no model request, no file written) or "tags" (Danbooru may be asked)."""
    preview: int = 3
    sample: Optional[int] = None
    seed: int = 0
    dataset: Optional[str] = None
    """`--dataset NAME_OR_PATH`: caption a Hugging Face dataset's rows instead of a folder (hf_run.py)."""


@dataclass
class RunResult:
    plan: RunPlan
    tally: Tally = field(default_factory=Tally)
    failures: List[Failure] = field(default_factory=list)
    unfinished: int = 0
    """Images the walk found needing a caption that were never captioned (the run stopped)."""
    unreached: int = 0
    """Images the walk had not reached when the run stopped."""
    stopped: Optional[str] = None
    next_step: Optional[str] = None
    """After a stop: what to do."""
    interrupted: bool = False
    setup_problem: bool = False
    """Stopped by a setup problem found mid-run (a model that cannot see): exit code 2."""
    captions_at: str = ""
    """Where the captions were written, in words."""
    nothing_to_do: Optional[str] = None
    """Why the run found no image to caption."""
    failures_file: Optional[Path] = None
    dry_run_report: Optional[str] = None
    report_page: Optional[Path] = None
    seconds: float = 0.0


class Run:
    def __init__(self, config: Config, options: RunOptions = RunOptions(), folder: Optional[Folder] = None):
        """`folder`: the images folder to walk (by default `images_dir` as configured)."""
        self.config, self.options = config, options
        self.tally = Tally()
        self.stopping = asyncio.Event()
        if options.dataset:  # a dataset's rows instead of a folder's images (hf_run.py)
            from tagcaption.hf_run import DatasetRun
            dataset = DatasetRun(config, options, self.tally)
            self.layout = dataset.layout
        else:
            self.layout = Layout(config, options.shard.suffix)
            self.folder = folder or Folder(self.layout.images_root, config.recursive, skip=self.layout.output_dir)
        self.stages = build_stages(config, self.tally, options.dry_run, options.refresh_tags)
        self.plan = self.stages.plan
        self.result = RunResult(self.plan, self.tally, captions_at=self.layout.describe_captions())
        if options.dataset:
            self.selection, self.captioner, self.writer = dataset.parts(self.stages, self._record_failure,
                                                                        self.stopping)
        else:
            self.selection = Selection(self.layout, self.folder, self.tally, self._record_failure,
                                       overwrite=config.output.overwrite, shard=options.shard,
                                       retry_failed=options.retry_failed, sample=options.sample, seed=options.seed)
            self.captioner = Captioner(config, self.layout, self.stages)
            self.writer = Writer(config, self.layout, self.folder, self.tally, dry_run=bool(options.dry_run))
        self.previews: Dict[str, dict] = {}
        self.workers: List[asyncio.Task] = []

    async def execute(self) -> RunResult:
        started = time.monotonic()
        walk = self.selection.walk()
        try:
            first = await anext(walk, None)
            if first is None:
                self.result.nothing_to_do = self.selection.why_empty()
                if hasattr(self.writer, "fold_in_leftovers"):  # a folder's writer; a dataset's merges parts itself
                    self.writer.fold_in_leftovers()
            else:
                with self._signals_handled():
                    starting = asyncio.ensure_future(self._start())
                    self.workers = [starting]  # a signal during the server check cancels it like a worker
                    try:
                        await starting
                    except asyncio.CancelledError:
                        if not self.stopping.is_set():
                            raise
                    if not self.stopping.is_set():
                        await self._caption_all(first, walk)
                await self._count_what_is_left()
                await self._note_unread()
            if self.options.dry_run:
                self.result.dry_run_report = format_preview(list(self.previews.items()), self.stages.llm,
                                                            self.plan.describe())
            self.result.failures_file = self.writer.save_failures(self.result.failures)
        finally:
            await walk.aclose()
            await self.stages.close()
            try:
                self.result.report_page = self.writer.close()
            finally:
                self.result.seconds = time.monotonic() - started
        return self.result

    async def _note_unread(self) -> None:
        """A folder not walked recursively whose subfolders hold images says so once, at the end."""
        folder = getattr(self.selection, "folder", None)  # a dataset's rows have none
        if folder is None or folder.recursive or not folder.unwalked:
            return
        try:
            names, complete = await off_loop(unread_images, folder, seconds=self.config.file_timeout,
                                             what="the subfolders")
        except ImageProblem:  # a slow share: the note is a courtesy, never a failure of the run
            return
        if names:
            shown = ", ".join(f"{name}/" for name in names[:5]) + (", …" if len(names) > 5 else "")
            many = len(names) != 1
            log.warning("note: %s%d subfolder%s of %s hold%s images this run did not read (%s); add recursive=true "
                        "to caption them too", "" if complete else "at least ", len(names), "s" if many else "",
                        self.layout.images_root.name, "" if many else "s", shown)

    async def _start(self) -> None:
        if not self.options.dry_run:
            await check_servers(self.stages, self.plan)
        if self.stages.tag_provider:
            self.stages.tag_provider.start()
        self.writer.start()

    async def _count_what_is_left(self) -> None:
        failed_in_work = self.tally["images.failed"]
        self.result.unfinished = self.tally["images.pending"] - self.tally["images.captioned"] - failed_in_work
        if self.stopping.is_set():  # stopped before the walk's end: how much is left?
            if not self.result.interrupted:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.selection.counted.wait(), COUNT_SECONDS)
            self.result.unreached = self.selection.unreached

    def _workers(self) -> int:
        """Twice each endpoint's slots: the endpoint always has work waiting while there is work."""
        endpoints = self.stages.llm.endpoints
        return 2 * sum(self.config.endpoints[name].concurrency * len(endpoints[name].replicas)
                       for name in self.plan.endpoints)

    async def _caption_all(self, first: str, walk: AsyncIterator[str]) -> None:
        progress = Progress(self.tally, self.options.progress, tags=self.stages.tag_provider is not None,
                            in_flight=self.stages.llm.in_flight)
        count = self._workers()
        lookahead = ROW_LOOKAHEAD if self.options.dataset else LOOKAHEAD
        queue: asyncio.Queue = asyncio.Queue(maxsize=max(count * 2, lookahead))
        self.workers = [asyncio.create_task(self._work(queue)) for _ in range(count)]
        producer = asyncio.create_task(self._produce(first, walk, queue))
        try:
            await asyncio.gather(*self.workers, return_exceptions=True)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            await self.writer.drain(self.config.stop_grace if self.stopping.is_set() else None)
            progress.close()

    async def _produce(self, first: str, walk: AsyncIterator[str], queue: asyncio.Queue) -> None:
        rel: Optional[str] = first
        try:
            while rel is not None and not self.stopping.is_set():
                if self.options.dry_run and len(self.previews) < self.options.preview:
                    self.previews[rel] = {}
                await queue.put(await self.captioner.prepare(rel))
                rel = await anext(walk, None)
        except Exception as exc:  # what was captioned stays; the summary says so, a rerun goes on
            log.debug("the walk broke off", exc_info=True)
            self._stop(f"cannot go on reading the images folder: {type(exc).__name__}: {exc}",
                       "rerun the same command when the folder can be read: it goes on where this run stopped")
        for _ in self.workers:
            await queue.put(None)

    async def _work(self, queue: asyncio.Queue) -> None:
        while not self.stopping.is_set() and (job := await queue.get()) is not None:
            item, tags = job
            transcript = self.previews.get(item.rel.as_posix(), {})  # conversations and guard trips
            try:
                if isinstance(tags, ImageProblem):
                    raise tags
                await self.writer.write(await self.captioner.caption(item, tags, transcript))
            except ImageProblem as problem:
                if problem.stops_run:
                    self._stop(str(problem), "fix what the line above says, then rerun the same command" if
                               problem.setup else "start the server again, then rerun the same command to continue",
                               setup_problem=problem.setup)
                    continue
                self._fail(item, problem)
            except Exception as exc:  # a bug must cost one image, not the run
                log.debug("unexpected error on %s", item.path, exc_info=True)
                self._fail(item, InternalError(f"unexpected {type(exc).__name__}: {exc}", stage="internal"))
            finally:
                if self.options.debug_dir and transcript:
                    await self.writer.write_transcript(self.options.debug_dir, item, transcript)

    def _fail(self, item: ImageItem, problem: ImageProblem) -> None:
        """An image failed in the stages or the writer."""
        if self._record_failure(item, problem):
            self.tally.update("images.failed")

    def _record_failure(self, item: ImageItem, problem: ImageProblem) -> bool:
        if self.options.dataset:  # rows, not files: nothing of the folder's can go away
            images_root = output_dir = None
        else:
            images_root = self.layout.images_root
            output_dir = self.layout.output_dir if self.writer.lock.held else None  # made when the lock is taken
        for name, folder in (("images folder", images_root), ("output.dir", output_dir)):
            if folder is not None and not folder.is_dir():
                # not this image's fault: every next one would fail too
                self._stop(f"the {name} {folder} is gone (moved, deleted or unmounted)",
                           "put the folder back and rerun the same command: the captions written so far are kept")
                return False
        message = redact(str(problem))
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "…"
        record = Failure(str(item.path), problem.stage or "input", problem.record_kind, message, problem.attempts)
        self.result.failures.append(record)
        log.error("failed: %s: %s", item.path, record.message, extra={
            "group": f"failed:{record.stage}:{record.kind}", "item": item.rel.as_posix(),
            "summary": f"{{count}} images failed in {record.stage} ({record.kind.replace('_', ' ')}): all listed in "
                       f"{self.layout.failures.name} and in the summary"})
        return True

    # --- stopping ------------------------------------------------------------------------

    def _stop(self, reason: str, next_step: str, interrupted: bool = False, setup_problem: bool = False,
              note: str = "") -> None:
        if self.stopping.is_set():
            return
        self.result.stopped = reason
        self.result.next_step = next_step
        self.result.interrupted = interrupted
        self.result.setup_problem = setup_problem
        self.stopping.set()
        log.warning("stopping: %s%s", reason, note)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping.is_set():
            self._cancel_workers()
            return
        grace = self.config.stop_grace
        self._stop(f"interrupted ({name})", "rerun the same command to continue: the captions written are kept",
                   interrupted=True, note=f": no new images; waiting up to {grace:g} s for those in flight "
                                          "(press Ctrl-C again to cancel them)")
        asyncio.get_running_loop().call_later(grace, self._cancel_workers)

    def _cancel_workers(self) -> None:
        for worker in self.workers:
            worker.cancel()

    @contextlib.contextmanager
    def _signals_handled(self):
        loop = asyncio.get_running_loop()
        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, self._on_signal, signum)
                installed.append(signum)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread, or a platform without it
        try:
            yield
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)


async def run(config: Config, options: RunOptions = RunOptions()) -> RunResult:
    return await Run(config, options).execute()
