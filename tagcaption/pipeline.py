"""One run: folder → images → tags → stages → captions, in one direction.

A producer walks the folder as captioning goes, so the first requests leave while a large
folder is still being walked and memory stays flat however large it is (a count of names,
in a thread, gives the progress bar its total). It takes the images that need a caption in
order, reads each one's tags and starts their lookups and summaries, and queues the image
up to LOOKAHEAD images ahead of a bounded pool of workers (so tag work
runs ahead of the images that need it). A worker takes one image through the
Interrogator and the Interpreter and writes its caption. Each image fails alone: its
error is recorded and the batch goes on. Ctrl-C or SIGTERM stops taking new images,
gives those in flight a few seconds, then saves what there is.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Dict, Iterator, List, Optional, Tuple

import openai
from tqdm import tqdm

from tagcaption.config import Config, ConfigError
from tagcaption.dry_run import DryRunLLM, DryRunSource, format_preview
from tagcaption.dataset import Dataset, ImageItem, ImageTags, Shard, read_image_tags
from tagcaption.files import atomic_write_text, write_new_file
from tagcaption.hints import HintInput, collect_hints, unknown_sources
from tagcaption.images import ImageError, check_image
from tagcaption.interpreter import Interpreter
from tagcaption.interrogator import Interrogator
from tagcaption.postprocess import add_affixes
from tagcaption.errors import Kind
from tagcaption.llm import LLM, LLMError, ServerDown, ServerUnreachable, StageUsage, redact
from tagcaption.outputs import DatasetOutputs, check_formats
from tagcaption.report import build_report
from tagcaption.run_state import FAILURES_FILE, CaptionRecord, Failure, LockedError, RunLock, read_failed_images, write_failures
from tagcaption.tag_provider import TagFilter, TagProvider, TagStats, TagSummaryError, tag_variables

log = logging.getLogger("caption")

STOP_GRACE_SECONDS = 5.0
LEFTOVER_AGE = 60.0
"""Seconds after which a temp file is a killed run's leftover even while other shards write."""
LOOKAHEAD = 1000
"""Images read ahead of the workers: their tags' lookups and summaries start early, and
Danbooru gets full batches, while memory stays bounded however large the folder."""
MAX_TAG_LENGTH = 200
"""Characters; Danbooru's longest tag names are well below it."""
MAX_MESSAGE = 1000
"""Characters of a failure message kept (a message may quote a whole broken input)."""
SCAN_CHUNK = 50
"""Entries (images or folders) the folder walk takes between two turns of the event loop."""
COUNT_WAIT = 3.0
"""Seconds a run that stopped early waits for the count of names, to say how many it left."""

# Failures that would repeat for every image: the run stops at the first one.
FATAL_KINDS = {"server_down", "no_vision"}


@dataclass
class RunResult:
    captioned: int = 0
    skipped: int = 0
    unfinished: int = 0
    unchecked: int = 0
    """Images the walk had not reached when the run stopped (their captions not looked at)."""
    failures: List[Failure] = field(default_factory=list)
    tags: Optional[TagStats] = None
    danbooru_requests: int = 0
    danbooru_down: Optional[str] = None
    usage: Dict[str, StageUsage] = field(default_factory=dict)
    backups: int = 0
    stopped: Optional[str] = None
    interrupted: bool = False
    fatal: bool = False
    """Stopped by a setup problem found mid-run (a model that cannot see): exit code 2."""
    shrunk: int = 0
    guards: Dict[str, int] = field(default_factory=dict)
    failures_file: Optional[Path] = None
    dry_run_report: Optional[str] = None
    report_page: Optional[Path] = None
    seconds: float = 0.0


class ImageFailed(Exception):
    """One image could not be captioned; carries what the failure record needs."""

    def __init__(self, stage: str, kind: str, message: str, attempts: int = 0):
        super().__init__(message)
        self.stage, self.kind, self.attempts = stage, kind, attempts


class Run:
    def __init__(self, config: Config, progress: Optional[bool] = None, retry_failed: bool = False,
                 refresh_tags: bool = False, debug_dir: Optional[Path] = None, shard: Shard = Shard(),
                 dry_run: Optional[str] = None, preview: int = 3, sample: Optional[int] = None,
                 sample_seed: int = 0):
        self.config = config
        self.shard = shard
        self.dry_run = dry_run
        """None, "llm" (no model request, no file written) or "tags" (Danbooru may be asked)."""
        self.preview = preview
        self.previews: Dict[str, dict] = {}
        self.sample, self.sample_seed = sample, sample_seed

        self.debug_dir = debug_dir
        self.progress = progress
        self.retry_failed = retry_failed
        self.result = RunResult()
        try:
            self.dataset = Dataset(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        unknown = unknown_sources(config.interrogator.hint_sources)
        if unknown:
            raise ConfigError(f"interrogator.hint_sources: unknown source(s) {', '.join(unknown)}")
        self.root = self.dataset.output_dir or self.dataset.root
        self.failures_file = self.root / FAILURES_FILE.format(suffix=shard.suffix)
        self.lock = RunLock(self.root, shard.suffix)
        self.record = CaptionRecord(self.root)
        problem = check_formats(config.output.formats)
        if problem:
            raise ConfigError(problem)
        formats = list(config.output.formats) + (["jsonl"] if config.output.report else [])  # the page reads it
        self.outputs = DatasetOutputs(formats, self.root, self.dataset.root, shard.suffix)
        self.llm = LLM.from_config(config)
        if dry_run:
            self.llm = DryRunLLM(self.llm)
        self.tag_bar = self.image_bar = None
        self.tag_filter = TagFilter(config.tags, config.tag_provider.min_post_count)
        self.tag_provider = None if config.tag_provider.skip else TagProvider(
            config, self.llm, on_tag_done=self._tag_done, on_tags_found=self._tags_found, refresh=refresh_tags)
        if self.tag_provider and dry_run == "llm":  # no Danbooru unless --dry-run=tags; the cache still answers
            self.tag_provider.source = DryRunSource()
        self.interrogator = None if config.interrogator.skip else Interrogator(config, self.llm)
        self.interpreter = None if config.interpreter.skip else Interpreter(config, self.llm)
        self.stopping = asyncio.Event()
        self.workers: List[asyncio.Task] = []
        self._writes: set = set()
        self.pending = 0
        """Images the walk found needing a caption (so far)."""
        self.failed_in_walk = 0
        self.selected: Optional[int] = None
        """How many images this run is asked for, once counted (skipped ones included)."""
        self._count_done = asyncio.Event()
        self._done_on_bar = 0

    async def execute(self) -> RunResult:
        started = time.monotonic()
        walk = self._walk()
        try:
            first = await anext(walk, None)
            if first is not None:
                if not self.dry_run:
                    await self._check_servers()
                if self.tag_provider:
                    self.tag_provider.start()
                    self.tag_provider.cache.read_only = bool(self.dry_run)
                if not self.dry_run:
                    self._take_lock()
                    self.outputs.merge()  # a journal left by a killed run
                with self._signals_handled():
                    await self._caption_all(first, walk)
                failed_in_work = len(self.result.failures) - self.failed_in_walk
                self.result.unfinished = self.pending - self.result.captioned - failed_in_work
                if self.stopping.is_set():  # stopped before the walk's end: how much is left?
                    if not self.result.interrupted:
                        with contextlib.suppress(asyncio.TimeoutError):
                            await asyncio.wait_for(self._count_done.wait(), COUNT_WAIT)
                    self.result.unchecked = max(0, (self.selected or 0) - self._walked())
            if self.dry_run:
                self.result.dry_run_report = format_preview(list(self.previews.items()), self.llm)
            else:
                self._save_failures()
        finally:
            await walk.aclose()
            await self._close()
            try:
                if self.lock.held:
                    self._remove_leftover_temps()
                    self._finish_outputs()
            finally:
                self.lock.release()
                self.result.seconds = time.monotonic() - started
        return self.result

    def _finish_outputs(self) -> None:
        """captions.jsonl, metadata.jsonl and the review page; the captions are safe either way."""
        try:
            self.outputs.merge()
            if self.config.output.report:
                self.result.report_page = build_report(self.config)
        except OSError as exc:
            log.error("error: cannot write the dataset files (%s); the captions are written, and the next run "
                      "merges this run's records", exc.strerror or exc)

    def _take_lock(self) -> None:
        try:
            note = self.lock.acquire()
        except (LockedError, OSError) as exc:
            raise ConfigError(str(exc)) from None
        if note:
            log.warning("warning: %s", note)
        self._remove_leftover_temps()

    def _remove_leftover_temps(self) -> None:
        """Temp files of a killed run, found by the walk. While another shard runs, a young
        one may be its write in progress: then only those LEFTOVER_AGE older than this run's
        lock go (both times from the same file server's clock)."""
        alone = not self.lock.others_running()
        cutoff = self.lock.path.stat().st_mtime - LEFTOVER_AGE
        while self.dataset.leftover_temps:
            leftover = self.dataset.leftover_temps.pop()
            with contextlib.suppress(OSError):
                if alone or leftover.stat().st_mtime <= cutoff:
                    leftover.unlink()

    async def _walk(self) -> AsyncIterator[str]:
        """The images that need a caption, as the walk finds them; the event loop turns
        every SCAN_CHUNK entries (images or folders) so requests flow meanwhile."""
        stop_counting = threading.Event()
        try:
            images = self._images_to_caption()
            if self.sample is not None:
                images = iter(self._sampled([rel for rel in images if rel]))
            else:
                self._start_count(stop_counting)
            for count, rel in enumerate(images, 1):
                if rel:
                    self.pending += 1
                    yield rel
                if count % SCAN_CHUNK == 0:
                    self._count_walked()
                    await asyncio.sleep(0)
        finally:
            stop_counting.set()
            self._count_walked()

    def _start_count(self, stop: threading.Event) -> None:
        """Count the images this run is asked for, for the progress bar, in a daemon thread
        that stops with the walk: a slow file server must not hold up the end of the run."""
        loop = asyncio.get_running_loop()

        def count() -> None:
            total = 0
            try:
                for selected in self._selected_images(ordered=False):
                    if stop.is_set():
                        return
                    total += selected is not None
            except Exception:  # the walk meets the same problem and reports it
                return
            with contextlib.suppress(RuntimeError):  # the run is over and its loop closed
                loop.call_soon_threadsafe(self._counted, total)
        threading.Thread(target=count, name="count-images", daemon=True).start()

    def _counted(self, total: int) -> None:
        self.selected = total
        self._count_done.set()
        self._count_walked()

    def _selected_images(self, ordered: bool = True) -> Iterator[Optional[Tuple[Path, str, str]]]:
        """(folder, name, path inside the images folder) of each image this run is asked for:
        the whole folder, this machine's shard, or the images that failed last time; None for
        each image left out and each folder without images, so that walking them still counts."""
        failed = self._failed_before() if self.retry_failed else None
        try:
            for folder, names in self.dataset.listing(ordered):
                yield None
                inside = folder.relative_to(self.dataset.root).as_posix()
                prefix = "" if inside == "." else f"{inside}/"
                for name in names:
                    rel = prefix + name
                    if (failed is None or os.path.join(folder, name) in failed) and self.shard.includes(rel):
                        yield folder, name, rel
                    else:
                        yield None
        except (ValueError, OSError) as exc:
            raise ConfigError(str(exc)) from None

    def _images_to_caption(self) -> Iterator[Optional[str]]:
        """For each image, its path inside the folder (a short string) when it needs a
        caption, else None (also for each entry left out); skips and collisions are counted."""
        current, previous = None, [None]
        for selected in self._selected_images():
            if selected is None:
                yield None
                continue
            folder, name, rel = selected
            if folder != current:
                current, previous = folder, [None]  # images sharing a stem come in a row
            # From one string, not folder / name: Python 3.11's pathlib interns the parts it is
            # given, and a listed name would stay in the intern table as long as the listing.
            path = Path(f"{folder}/{name}")
            yield rel if self._check(path, previous) is not None else None

    def _sampled(self, pending: List[str]) -> List[str]:
        if len(pending) <= self.sample:
            return pending
        return sorted(random.Random(self.sample_seed).sample(pending, self.sample))

    def _walked(self) -> int:
        return self.pending + self.result.skipped + self.failed_in_walk

    def _total(self) -> int:
        """Images this run is asked for: counted, or as far as the walk has gone."""
        return max(self.selected or 0, self._walked())

    def _count_walked(self) -> None:
        """The image bar: images the walk skips or fails count as done as they are found."""
        done = self.result.skipped + self.failed_in_walk
        if self.image_bar is not None:
            self.image_bar.total = self._total()
            self.image_bar.update(done - self._done_on_bar)
        self._done_on_bar = done

    def _check(self, path: Path, previous: List[Optional[ImageItem]]) -> Optional[ImageItem]:
        """The image's item when it needs a caption; None when it is done or cannot be done.
        A caption must never land on a file another image relies on."""
        try:
            item = self.dataset.item(path)
            done = not self.config.output.overwrite and item.has_caption()
        except OSError as exc:
            rel = path.relative_to(self.dataset.root)
            self.failed_in_walk += 1
            self._fail(ImageItem(path, rel, path, None, None), ImageFailed(
                "input", "tags_file", f"cannot read {exc.filename or path}: {exc.strerror or exc}"))
            return None
        before = previous[0]
        other = before.path if before is not None and before.caption_file == item.caption_file else \
            self.dataset.tags_owner(path)
        previous[0] = item
        if other is not None:
            self.failed_in_walk += 1
            self._fail(item, ImageFailed("output", "caption_collision",
                                         f"its caption file {item.caption_file.name} would replace a file of "
                                         f"{other.name} (same name stem); rename one of them"))
            return None
        if done:
            self.result.skipped += 1
            return None
        return item

    def _failed_before(self) -> set:
        if not self.failures_file.exists():
            raise ConfigError(f"--retry-failed: no {self.failures_file} from an earlier run")
        return set(read_failed_images(self.failures_file))

    def _used_endpoints(self) -> Dict[str, List]:
        used: Dict[str, List] = {}
        for stage in (self.tag_provider, self.interrogator, self.interpreter):
            if stage is not None:
                used.setdefault(stage.settings.endpoint, []).append(stage.settings.model)
        return used

    async def _check_servers(self) -> None:
        """Fail fast (exit 2) when a server the run needs does not answer at all."""
        for name, models in self._used_endpoints().items():
            endpoint = self.llm.endpoints[name]
            try:
                listed = await endpoint.list_models()
            except ServerUnreachable as exc:
                raise ConfigError(str(exc)) from None
            except openai.OpenAIError as exc:
                log.warning("warning: %s could not list its models (%s); going on", endpoint.describe(), exc)
                continue
            for model in sorted(set(models)):
                if listed and model not in listed:
                    log.warning("warning: model '%s' is not listed by %s (it lists: %s)",
                                model, endpoint.describe(), ", ".join(listed[:8]))

    # --- running -------------------------------------------------------------------------

    async def _caption_all(self, first: str, walk: AsyncIterator[str]) -> None:
        show = self.progress
        if self.tag_provider:
            self.tag_bar = tqdm(total=0, desc="tags", unit="tag", disable=show is False, position=0,
                                leave=True, dynamic_ncols=True)
        self.image_bar = tqdm(total=self._total(), initial=self._done_on_bar, desc="images",
                              unit="img", disable=show is False, position=1 if self.tag_bar else 0, leave=True,
                              dynamic_ncols=True)
        count = 2 * sum(self.config.endpoints[name].concurrency * len(self.llm.endpoints[name].replicas)
                        for name in self._used_endpoints())
        queue: asyncio.Queue = asyncio.Queue(maxsize=max(count * 2, LOOKAHEAD))
        self.workers = [asyncio.create_task(self._work(queue)) for _ in range(count)]
        producer = asyncio.create_task(self._produce(first, walk, queue))
        try:
            await asyncio.gather(*self.workers, return_exceptions=True)
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)
            await asyncio.gather(*self._writes, return_exceptions=True)
            for bar in (self.tag_bar, self.image_bar):
                if bar is not None:
                    bar.close()

    async def _produce(self, first: str, walk: AsyncIterator[str], queue: asyncio.Queue) -> None:
        rel: Optional[str] = first
        try:
            while rel is not None and not self.stopping.is_set():
                if self.dry_run and len(self.previews) < self.preview:
                    self.previews[rel] = {}
                await queue.put(await self._read_ahead(rel))
                rel = await anext(walk, None)
        except Exception as exc:  # what was captioned stays; the summary says so, a rerun goes on
            log.debug("the walk broke off", exc_info=True)
            self._stop(f"cannot go on reading the images folder: {type(exc).__name__}: {exc}")
        for _ in self.workers:
            await queue.put(None)

    async def _read_ahead(self, rel: str) -> tuple:
        """The image and its tags (or why they could not be read); its tags' lookups and
        summaries start now."""
        path = Path(f"{self.dataset.root}/{rel}")  # see _images_to_caption
        try:
            item = self.dataset.item(path)
        except OSError as exc:
            item = ImageItem(path, Path(rel), path, None, None)
            return item, ImageFailed("input", "tags_file", f"cannot read {exc.filename or path}: "
                                                          f"{exc.strerror or exc}")
        tags = await self._read_tags(item)
        if self.tag_provider and isinstance(tags, ImageTags):
            self.tag_provider.prefetch(self._to_look_up(tags))
        return item, tags

    async def _read_tags(self, item: ImageItem):
        """The image's tags, or the ImageFailed that reading them ended in."""
        try:
            return await asyncio.to_thread(read_image_tags, item, self.config.tags.sources, self.config.tags.combine)
        except OSError as exc:
            where = exc.filename or item.tags_file
            return ImageFailed("tags", "tags_file", f"cannot read tags file {where}: {exc.strerror or exc}")
        except ValueError as exc:
            return ImageFailed("tags", "tags_file", f"cannot read tags: {exc}")
        except Exception as exc:  # a sidecar that breaks the parser must cost one image, not the run
            return ImageFailed("tags", "tags_file", f"cannot read tags: {type(exc).__name__}: {exc}")

    async def _work(self, queue: asyncio.Queue) -> None:
        while not self.stopping.is_set() and (job := await queue.get()) is not None:
            item, tags = job
            try:
                if isinstance(tags, ImageFailed):
                    raise tags
                await self._caption(item, tags)
            except ImageFailed as failure:
                if failure.kind in FATAL_KINDS:
                    self._stop(str(failure), fatal=failure.kind == "no_vision")
                    continue
                self._fail(item, failure)
            except Exception as exc:  # a bug must cost one image, not the run
                log.debug("unexpected error on %s", item.path, exc_info=True)
                self._fail(item, ImageFailed("internal", "internal_error", f"unexpected {type(exc).__name__}: {exc}"))
            self.image_bar.update(1)

    def _to_look_up(self, tags: ImageTags) -> List[str]:
        """Tags worth asking Danbooru about: not excluded, and short enough to be a tag at all
        (one overlong "tag" would break the URL of the whole batch it shares with others)."""
        return [tag for tag in tags.tags
                if len(tag) <= MAX_TAG_LENGTH and not self.tag_filter.excluded_by_name(tag)]

    async def _caption(self, item: ImageItem, tags: ImageTags) -> None:
        transcript: dict = self.previews.get(item.rel.as_posix(), {})  # conversations and guard trips
        try:
            await self._run_stages(item, tags, transcript)
        finally:
            if self.debug_dir and transcript:
                await asyncio.to_thread(self._write_transcript, item, transcript)

    async def _run_stages(self, item: ImageItem, tags: ImageTags, transcript: dict) -> None:
        stage = "input"
        key = item.rel.as_posix()
        try:
            if not tags.tags and not self.interrogator:
                raise ImageFailed(stage, "no_tags",
                                  f"no tags ({item.path.stem}{self.config.tags_extension or ''} missing or empty) "
                                  "and the Interrogator is off: nothing to caption from")
            if not self.interrogator:
                await asyncio.to_thread(check_image, item.path)
            stage = "tag_provider"
            knowledge = await self.tag_provider.knowledge(self._to_look_up(tags)) if self.tag_provider else {}
            values = {"filename": item.path.name, "folder": item.rel.parent.as_posix(), "name": self.config.style.name,
                      **tag_variables(tags.tags, knowledge, tags.categories, tags.rating, self.tag_filter)}
            values["hints"] = await asyncio.to_thread(
                collect_hints, self.config.interrogator.hint_sources, HintInput(item.path, item.rel, tags.tags))
            values["description"] = ""
            if self.interrogator:
                stage = "interrogator"
                values["description"] = await self.interrogator.describe(item.path, values, key, transcript)
            stage = "interpreter"
            caption = await self.interpreter.caption(values, key, transcript) if self.interpreter \
                else values["description"]
            caption = add_affixes(caption, self.config.postprocess.prefix, self.config.postprocess.suffix)
            stage = "output"
            await self._write(item, caption, self._record(item, caption, values, transcript))
        except ImageFailed:
            raise
        except ServerDown as exc:
            raise ImageFailed(stage, "server_down", str(exc), exc.attempts) from None
        except LLMError as exc:
            if exc.kind == "no_vision":
                settings = self.config.interrogator
                exc = LLMError(f"the model '{settings.model}' on {self.llm.endpoints[settings.endpoint].describe()} "
                               f"cannot see images ({exc}). Load a vision model (for llama.cpp, start it with "
                               "--mmproj) or set interrogator.model", Kind.NO_VISION)
            raise ImageFailed(stage, exc.record_kind, str(exc), exc.attempts) from None
        except TagSummaryError as exc:
            raise ImageFailed(stage, "tag_summary", str(exc)) from None
        except ImageError as exc:
            raise ImageFailed("input", "image", f"image: {exc}") from None
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            raise ImageFailed(stage, "file", f"{exc.strerror or exc}{where}") from None

    def _record(self, item: ImageItem, caption: str, values: Dict[str, str], transcript: dict) -> dict:
        """The line for captions.jsonl / metadata.jsonl."""
        models = {name: stage.settings.model for name, stage in (
            ("tag_provider", self.tag_provider), ("interrogator", self.interrogator),
            ("interpreter", self.interpreter)) if stage is not None}
        return {"file": item.rel.as_posix(), "caption": caption, "tags": values.get("tags", ""),
                "description": values.get("description", ""), "models": models,
                "guards": transcript.get("guards", []), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}

    async def _write(self, item: ImageItem, caption: str, record: dict) -> None:
        """Write in a thread that, once started, always finishes and is counted (a cancelled
        worker does not stop it, and the run waits for it before releasing the lock)."""
        if self.dry_run:
            self.result.captioned += 1
            return
        write = asyncio.ensure_future(asyncio.to_thread(self._write_caption, item, caption, record))
        self._writes.add(write)

        def done(future: asyncio.Future) -> None:
            self._writes.discard(future)
            if not future.cancelled() and future.exception() is None:
                self.result.captioned += 1
        write.add_done_callback(done)
        await asyncio.shield(write)

    def _write_transcript(self, item: ImageItem, transcript: dict) -> None:
        """`--debug-dir`: the image's whole conversation, one file per image, no API keys."""
        name = item.rel.as_posix().replace("%", "%25").replace("/", "%2F") + ".json"  # one file per image
        record = {"image": str(item.path), **transcript}
        atomic_write_text(self.debug_dir / name, redact(json.dumps(record, ensure_ascii=False, indent=2)) + "\n")

    def _write_caption(self, item: ImageItem, caption: str, record: dict) -> None:
        """Write the caption; first keep what it would replace: the tags (see dataset.py), or a
        caption that this program did not write or that was edited since."""
        if item.tags_backup is not None and not item.tags_backup.exists():
            if item.prose_caption:
                self._keep_backup(item.caption_file)
            original = item.caption_file.read_bytes() if item.caption_file.exists() and not item.prose_caption else b""
            write_new_file(item.tags_backup, original, like=item.caption_file)
        elif item.caption_file.exists() and not self._replaceable(item):
            if not self.config.output.overwrite:
                raise ImageFailed("output", "caption_exists",
                                  f"{item.caption_file} appeared during the run; not replaced")
            self._keep_backup(item.caption_file)
        self.record.record(item.caption_file, caption)  # first: a kill in between only costs a spare .bak
        atomic_write_text(item.caption_file, caption)
        self.outputs.record(record)

    def _replaceable(self, item: ImageItem) -> bool:
        current = item.caption_file.read_bytes()
        if item.tags_backup is not None and current == item.tags_backup.read_bytes():
            return True  # a tags file whose copy is already kept
        return self.record.is_ours(item.caption_file, current.decode("utf-8", "replace"))

    def _keep_backup(self, caption_file: Path) -> None:
        data = caption_file.read_bytes()
        for number in range(1, 1000):
            suffix = ".bak" if number == 1 else f".bak{number}"
            if write_new_file(caption_file.with_name(caption_file.name + suffix), data, like=caption_file):
                self.result.backups += 1
                return
        raise ImageFailed("output", "backup", f"no free backup name for {caption_file}")

    def _fail(self, item: ImageItem, failure: ImageFailed) -> None:
        message = redact(str(failure))
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "…"
        record = Failure(str(item.path), failure.stage, failure.kind, message, failure.attempts)
        self.result.failures.append(record)
        log.error("failed: %s: %s", item.path, record.message)

    # --- stopping ------------------------------------------------------------------------

    def _stop(self, reason: str, interrupted: bool = False, fatal: bool = False) -> None:
        if self.stopping.is_set():
            return
        self.result.stopped = reason
        self.result.interrupted = interrupted
        self.result.fatal = fatal
        self.stopping.set()
        log.warning("stopping: %s", reason)

    def _on_signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self.stopping.is_set():
            self._cancel_workers()
            return
        self._stop(f"{name}: no new images; waiting up to {STOP_GRACE_SECONDS:.0f} s for those in flight "
                   "(press Ctrl-C again to cancel them)", interrupted=True)
        asyncio.get_running_loop().call_later(STOP_GRACE_SECONDS, self._cancel_workers)

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

    # --- closing -------------------------------------------------------------------------

    def _save_failures(self) -> None:
        """`failures.jsonl` lists this run's failures (an empty file when there were none)."""
        if self.result.failures or self.failures_file.exists():
            try:
                write_failures(self.failures_file, self.result.failures)
            except OSError as exc:
                log.error("error: cannot write %s (%s); the failures are listed above", self.failures_file,
                          exc.strerror or exc)
                return
            self.result.failures_file = self.failures_file

    def _tags_found(self, count: int) -> None:
        if self.tag_bar is not None:
            self.tag_bar.total += count
            self.tag_bar.refresh()

    def _tag_done(self) -> None:
        if self.tag_bar is not None:
            self.tag_bar.update(1)

    async def _close(self) -> None:
        if self.tag_provider:
            await self.tag_provider.close()
            self.result.tags = self.tag_provider.stats
            self.result.danbooru_requests = self.tag_provider.source_requests
            self.result.danbooru_down = self.tag_provider.source_down
        self.result.usage = dict(self.llm.usage)
        self.result.guards = dict(self.llm.guards.counts) if self.llm.guards else {}
        if self.interrogator:
            self.result.shrunk = self.interrogator.shrunk
        await self.llm.close()


async def run(config: Config, **options) -> RunResult:
    return await Run(config, **options).execute()
