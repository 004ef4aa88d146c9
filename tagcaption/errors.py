"""Every exception the program raises on purpose, and what each one means for the run.

What an error does follows from its type, never from its message:

- `ConfigError` and its kin (`setup = True`): found before anything was written; the CLI
  prints one line and exits 2.
- `ImageProblem` subclasses: one image fails, with a record in `failures.jsonl`; the batch
  goes on. Those with `stops_run = True` would fail every image the same way (a server gone,
  a model that cannot see), so the run stops at the first one; `setup = True` among them
  makes the exit code 2.
- `SourceError`: a tag lookup failed; captioning goes on with tags only. Danbooru never
  stops a run.

`str()` of every error is one line for the user; the CLI turns them into output at its edge.
"""
from __future__ import annotations

import enum
from typing import Optional


class Kind(str, enum.Enum):
    """Why an image failed, as `failures.jsonl` spells it (`http` and `guard` get the status
    or the guard's name appended: `http_503`, `guard_refusal`)."""
    CONNECTION = "connection"
    TIMEOUT = "timeout"
    HTTP = "http"
    MALFORMED_REPLY = "malformed_reply"
    REPLY_ERROR = "reply_error"
    STREAM_ERROR = "stream_error"
    STREAM_CUT = "stream_cut"
    EMPTY_CHOICES = "empty_choices"
    TOO_LARGE = "reply_too_large"
    CONTEXT_OVERFLOW = "context_overflow"
    NO_VISION = "no_vision"
    SERVER_DOWN = "server_down"
    GUARD = "guard"
    ERROR = "error"
    TAG_SUMMARY = "tag_summary"
    IMAGE = "image"
    TAGS_FILE = "tags_file"
    NO_TAGS = "no_tags"
    FILE = "file"
    COLLISION = "caption_collision"
    CAPTION_EXISTS = "caption_exists"
    BACKUP = "backup"
    INTERNAL = "internal_error"


class TagcaptionError(Exception):
    """Base of every error below; `str()` is one line for the user."""

    setup = False
    """Exit code 2: a configuration or setup problem."""
    stops_run = False
    """It would repeat for every image: the run stops at the first one."""


class ConfigError(TagcaptionError):
    """A problem with the configuration or setup; the run stops before touching any file."""

    setup = True
    stops_run = True


class LockedError(ConfigError):
    """Another run holds the folder's lock."""


# --- one image fails ----------------------------------------------------------------------


class ImageProblem(TagcaptionError):
    """One image cannot be captioned. `stage` is filled in by the captioner when the error
    rises from a stage; `attempts` counts the requests it took."""

    kind: Kind = Kind.ERROR

    def __init__(self, message: str, attempts: int = 0, stage: Optional[str] = None):
        super().__init__(message)
        self.attempts = attempts
        self.stage = stage

    @property
    def record_kind(self) -> str:
        return self.kind.value


class LLMError(ImageProblem):
    """A request that did not produce usable text."""

    def __init__(self, message: str, kind: Kind = Kind.ERROR, attempts: int = 1, status: Optional[int] = None,
                 guard: Optional[str] = None, stage: Optional[str] = None):
        super().__init__(message, attempts, stage)
        self.kind = kind
        self.status = status
        self.guard = guard

    @property
    def record_kind(self) -> str:
        if self.kind is Kind.HTTP and self.status is not None:
            return f"http_{self.status}"
        if self.kind is Kind.GUARD and self.guard:
            return f"guard_{self.guard}"
        return self.kind.value


class GuardTripped(LLMError):
    """Every attempt's reply tripped a quality guard (refusal, loop, cut off…)."""

    def __init__(self, message: str, guard: str, attempts: int = 1):
        super().__init__(message, Kind.GUARD, attempts, guard=guard)


class NoVision(LLMError):
    """The Interrogator's model does not take images: every image would fail the same way."""

    setup = True
    stops_run = True

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message, Kind.NO_VISION, attempts)


class ServerUnreachable(LLMError):
    """No replica of an endpoint answers at the start of a run (exit 2)."""

    setup = True
    stops_run = True

    def __init__(self, message: str):
        super().__init__(message, Kind.CONNECTION)


class ServerDown(LLMError):
    """An endpoint stopped answering mid-run: stop, a rerun continues."""

    stops_run = True

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message, Kind.SERVER_DOWN, attempts)


class TagSummaryError(ImageProblem):
    kind = Kind.TAG_SUMMARY


class ImageError(ImageProblem):
    """The file cannot be used as an image."""

    kind = Kind.IMAGE


class TagsFileError(ImageProblem):
    """The image's tags (file or sidecar) cannot be read."""

    kind = Kind.TAGS_FILE


class NothingToCaption(ImageProblem):
    kind = Kind.NO_TAGS


class OutputProblem(ImageProblem):
    """A caption file that cannot or must not be written."""

    kind = Kind.FILE


class CaptionCollision(OutputProblem):
    kind = Kind.COLLISION


class CaptionAppeared(OutputProblem):
    kind = Kind.CAPTION_EXISTS


class NoBackupName(OutputProblem):
    kind = Kind.BACKUP


class InternalError(ImageProblem):
    """A bug met while captioning one image: it costs that image, not the run."""

    kind = Kind.INTERNAL


class FolderGone(TagcaptionError):
    """The images folder stopped being readable mid-run: stop, with the summary."""

    stops_run = True


# --- tag knowledge --------------------------------------------------------------------------


class SourceError(TagcaptionError):
    """A tag lookup failed; the captions go on with tags only."""


class SourceUnreachable(SourceError):
    """The tag source does not answer at all: stop asking it for this run."""


def os_error_text(exc: OSError, path: object = None, what: str = "") -> str:
    """`cannot read tags file a.txt: Permission denied`: the one wording for a failed read."""
    where = " ".join(str(part) for part in (what, exc.filename or path) if part)
    return f"cannot read {where}: {exc.strerror or exc}"
