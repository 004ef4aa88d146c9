"""Caption a folder of images with tags, tag summaries and a vision model's description.

    python caption.py [IMAGES_DIR] [--config FILE] [KEY=VALUE ...]
    python caption.py check [--config FILE] [KEY=VALUE ...]     test servers, models, tag source
    python caption.py report [IMAGES_DIR] [--config FILE]       write captions.html
    python caption.py --dataset NAME_OR_PATH [KEY=VALUE ...]    caption a Hugging Face dataset
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import threading
from pathlib import Path
from typing import List, Optional

from tagcaption.config import DEFAULT_CONFIG, load_config
from tagcaption.errors import ConfigError, TagcaptionError
from tagcaption.messages import log_to_terminal
from tagcaption.sinks import say
from tagcaption.version import NAME, VERSION

EXIT_OK, EXIT_FAILURES, EXIT_SETUP, EXIT_INTERRUPTED = 0, 1, 2, 130

EPILOG = """\
commands:
  {prog} IMAGES_DIR           caption the folder (the default command)
  {prog} check                test the servers, models and tag source a run needs; no captions
  {prog} report [IMAGES_DIR]  write captions.html, a review page of the folder's captions
  {prog} --dataset NAME_OR_PATH   caption a Hugging Face dataset's rows (docs/datasets.md)
  {prog} join OUT... --into DIR   join the dataset outputs of several --shard runs

overrides:
  KEY=VALUE pairs change any config key for this run, with dots for nesting:
    interpreter.model=mistral-7b
    endpoints.default.concurrency=16
    interrogator.skip=false output.overwrite=true
  Lists use brackets: interrogator.hint_sources=[full_path,tags]

exit codes: 0 all images captioned or skipped, 1 some images failed or the run
            stopped early, 2 configuration or setup problem (nothing was written),
            130 interrupted (Ctrl-C or SIGTERM)
"""


COMMANDS = ("check", "report")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "caption"
    prog = program_name()
    parser = argparse.ArgumentParser(
        prog=prog if command == "caption" else f"{prog} {command}", description=__doc__.strip().splitlines()[0],
        epilog=EPILOG.format(prog=prog), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images_dir", nargs="?", metavar="IMAGES_DIR",
                        help="folder of images (overrides images_dir from the config)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"config file (default: {DEFAULT_CONFIG})")
    parser.add_argument("--style", metavar="PRESET",
                        help="caption style preset from templates/styles/ (sets interpreter.style, or "
                             "interrogator.style when the Interpreter is off)")
    parser.add_argument("--dry-run", action="store_const", const="llm",
                        help="send nothing to a model and write nothing: show what would be sent "
                             "(--dry-run=tags also asks Danbooru)")
    for mode in ("llm", "tags"):  # the old `--dry-run=MODE` forms: a flag of its own, so no value is swallowed
        parser.add_argument(f"--dry-run={mode}", dest="dry_run", action="store_const", const=mode,
                            help=argparse.SUPPRESS)
    parser.add_argument("--preview", type=int, default=3, metavar="N",
                        help="with --dry-run: how many images to show whole (default 3)")
    parser.add_argument("--sample", type=int, metavar="N", help="caption only N images picked at random")
    parser.add_argument("--seed", type=int, default=0, help="the random seed of --sample (default 0)")
    parser.add_argument("--shard", metavar="K/N",
                        help="caption only this machine's share of the folder (K of N, by path hash)")
    parser.add_argument("--dataset", metavar="NAME_OR_PATH",
                        help="caption a Hugging Face dataset instead of a folder: a folder written by save_to_disk, "
                             "a parquet file, or a name on the Hub (see the dataset.* keys)")
    parser.add_argument("--retry-failed", action="store_true",
                        help="caption only the images listed in failures.jsonl by the previous run")
    parser.add_argument("--refresh-tags", action="store_true",
                        help="look up and summarise this run's tags again, ignoring the cache")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of unexpected errors")
    parser.add_argument("--debug-dir", metavar="DIR", type=Path,
                        help="write each image's whole conversation with the models as DIR/<image>.json")
    parser.add_argument("--version", action="version", version=f"{NAME} {VERSION}")
    args = parser.parse_intermixed_args(argv)
    args.command = command
    if args.sample is not None and args.sample < 1:
        parser.error("--sample takes a number of images, 1 or more")
    if args.preview < 0:
        parser.error("--preview takes 0 or more")
    if args.images_dir and "=" in args.images_dir and not os.path.exists(args.images_dir):
        args.overrides.insert(0, args.images_dir)
        args.images_dir = None
    args.usage = parser.format_usage().strip()
    return args


def program_name() -> str:
    """The program as it was invoked: `caption.py`, `caption`, or `python -m tagcaption`."""
    name = os.path.basename(sys.argv[0] or "caption")
    return "python -m tagcaption" if name == "__main__.py" else name


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["join"]:  # the dataset outputs of several shards joined (hf_output.py)
        from tagcaption.hf_output import main as join
        return join(argv[1:])
    args = parse_args(argv)
    terminal = log_to_terminal(args.debug)
    from tagcaption import tls
    tls.prepare()  # in a thread, while the OpenAI SDK imports
    try:
        result = _run(args)
    finally:
        terminal.flush_groups()
    return _report(result)


def _report(result) -> int:
    """Print what the command returned, and its exit code."""
    if isinstance(result, int):
        return result
    from tagcaption.summary import format_summary
    if result.dry_run_report is not None:
        say(result.dry_run_report)
    say(format_summary(result))
    return exit_code(result)


def _run(args) -> object:
    """The command's result, or the exit code of the error it ended in (told in one line)."""
    try:
        return _command(args)
    except TagcaptionError as exc:
        say(f"error: {exc}", sys.stderr)
        return EXIT_SETUP if exc.setup else EXIT_FAILURES
    except KeyboardInterrupt:
        say("interrupted", sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug: one line for the user, the traceback with --debug
        if args.debug:
            raise
        say(f"error: unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", sys.stderr)
        return EXIT_FAILURES


def _command(args: argparse.Namespace):
    """Run the command; an exit code, or the caption run's result."""
    from tagcaption.selection import Shard
    shard = Shard.parse(args.shard) if args.shard else Shard()
    config = load_config(args.config, args.overrides, args.images_dir)
    if args.dataset and args.command == "caption":
        from tagcaption.config_checks import check_dataset_run
        check_dataset_run(config, args.images_dir, args.sample, shard.count)
    elif args.command != "check" and args.images_dir is None and not _is_folder(config.images_dir):
        say(args.usage, sys.stderr)
        where = f" and images_dir ({config.images_dir}) does not exist" if config.images_dir else ""
        raise ConfigError(f"no images folder given{where}: name the folder, as in {program_name()} path/to/images")
    if args.style:
        stage = config.interrogator if config.interpreter.skip else config.interpreter
        stage.style = args.style
    if args.command == "check":
        from tagcaption.check import run_check
        return asyncio.run(run_check(config))
    if args.command == "report":
        from tagcaption.report import build_report
        try:
            say(f"Review page written: {build_report(config)}")
        except OSError as exc:
            raise ConfigError(f"cannot write the review page: {exc}") from None
        return EXIT_OK
    from tagcaption.run import RunOptions, run
    options = RunOptions(progress=False if args.no_progress else None, retry_failed=args.retry_failed,
                         refresh_tags=args.refresh_tags, shard=shard, dry_run=args.dry_run,
                         debug_dir=args.debug_dir.resolve() if args.debug_dir else None, preview=args.preview,
                         sample=args.sample, seed=args.seed, dataset=_dataset(args.dataset))
    return asyncio.run(run(config, options))


def _dataset(name: Optional[str]) -> Optional[str]:
    """A dataset path that exists, from where the command runs; anything else is a Hub name."""
    if not name:
        return None
    return str(Path(name).expanduser().resolve()) if os.path.exists(os.path.expanduser(name)) else name


def _is_folder(path: Optional[str]) -> bool:
    return bool(path) and os.path.isdir(path)


def exit_code(result) -> int:
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.setup_problem:
        return EXIT_SETUP
    return EXIT_FAILURES if result.failures or result.stopped else EXIT_OK


def cli() -> None:
    """The `caption` command that `pip install .` creates."""
    exit_now(main())


def exit_now(code: int) -> None:
    """Exit without the interpreter's teardown of the OpenAI SDK's thousands of classes, which
    takes 0.1–0.2 s after every run. Safe only once nothing is left to finish: the run has
    written and fsynced every file and released its lock, and only daemon threads remain."""
    logging.shutdown()
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):  # a closed pipe: nothing more can be said
        os._exit(code)
    if all(thread.daemon for thread in threading.enumerate() if thread is not threading.main_thread()):
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
