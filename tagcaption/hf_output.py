"""`--dataset`: the captioned dataset at `dataset.output_path`, saved in parts as the run
goes and joined into one dataset at its end.

    output_path/                  load_from_disk(output_path) opens the joined dataset
      data-*.arrow, state.json…   the joined dataset (rows in the source's order)
      captions.jsonl              one line per caption written, as it is written
      failures[-K-of-N].jsonl     the rows that failed in the last run
      .tagcaption/lock[-K-of-N]   one run at a time
      .tagcaption/dataset.json    which dataset and shard this output holds
      .tagcaption/rows.json       the id and source index of each row of the joined dataset
      .tagcaption/parts/part-N/   every `save_interval` rows: a dataset of its own, with rows.json
      .tagcaption/joining/        a join being put in place

A part is saved to a hidden folder, flushed, then renamed: it is whole or absent, so a
run killed at any moment loses at most the rows since the last part (and those are in
`captions.jsonl`, which the next run takes them from). Rows in a part or in the joined
dataset are done; a rerun skips them. The join writes the new dataset beside the old one
first and puts it in place by hard links; `rows.json` is written last, so a join cut short
is finished by the next run and never half used. The parts are removed once joined.

`caption.py join OUT... --into JOINED` joins the outputs of several shards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from tagcaption.errors import ConfigError
from tagcaption.files import atomic_write_text, json_text
from tagcaption.layout import CAPTIONS_FILE, FAILURES_FILE, STATE_DIR
from tagcaption.sinks import redact

ROWS_FILE = "rows.json"
PART = "part-"
DATASET_FILES = ("state.json", "dataset_info.json")


class DatasetLayout:
    """Every path a dataset run writes, under `output_path`."""

    def __init__(self, root: Path, shard_suffix: str = ""):
        self.root, self.suffix = root, shard_suffix
        ancestor = root
        while not ancestor.is_dir() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        self.images_root = ancestor
        """The folder whose going away stops the run (run.py): the output, once it exists."""

    state_dir = property(lambda self: self.root / STATE_DIR)
    lock = property(lambda self: self.state_dir / f"lock{self.suffix}")
    info = property(lambda self: self.state_dir / "dataset.json")
    final_rows = property(lambda self: self.state_dir / ROWS_FILE)
    parts = property(lambda self: self.state_dir / "parts")
    joining = property(lambda self: self.state_dir / "joining")
    failures = property(lambda self: self.root / FAILURES_FILE.format(suffix=self.suffix))
    captions_jsonl = property(lambda self: self.root / CAPTIONS_FILE)

    def describe_captions(self) -> str:
        return f"the dataset in {self.root} (open it with datasets.load_from_disk)"


@dataclass
class Saved:
    """A dataset written by a run (a part, or the joined one) and which rows it holds."""
    path: Path
    ids: List[str]
    indices: List[int]


def read_rows(path: Path) -> Optional[Tuple[List[str], List[int]]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
        return [str(row_id) for row_id in rows["ids"]], [int(index) for index in rows["indices"]]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        return None


def write_rows(path: Path, ids: List[str], indices: List[int]) -> None:
    atomic_write_text(path, json.dumps({"ids": ids, "indices": indices}, ensure_ascii=False) + "\n")


def _fsync_tree(folder: Path) -> None:
    for file in folder.iterdir():
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _link(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:  # no hard links here (FAT, some shares): a copy does the same
        shutil.copy2(source, target)


class PartStore:
    """The parts and the joined dataset under one output_path (the run holds its lock)."""

    def __init__(self, layout: DatasetLayout):
        self.layout = layout
        self.saving = threading.Lock()
        """Held while a part is written: the end of the run waits for the one under way."""

    def check_owner(self, source: str, shard: str) -> None:
        """Refuse an output_path holding files of someone else, or another shard's rows."""
        root, info = self.layout.root, self.layout.info
        if root.exists() and not root.is_dir():
            raise ConfigError(f"dataset.output_path {root} is a file: name a folder")
        if root.is_dir() and any(root.iterdir()) and not self.layout.state_dir.is_dir():
            raise ConfigError(f"dataset.output_path {root} holds files tagcaption did not write: name a new or "
                              "empty folder")
        try:
            recorded = json.loads(info.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return
        if isinstance(recorded, dict) and recorded.get("shard", shard) != shard:
            raise ConfigError(f"dataset.output_path {root} holds the rows of shard {recorded['shard']}, not "
                              f"{shard}: give each shard its own output_path")

    def claim(self, source: str, shard: str) -> None:
        self.layout.parts.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.layout.info, json.dumps({"dataset": source, "shard": shard}) + "\n")
        self.finish_join()
        for leftover in self.layout.parts.glob(f".{PART}*"):  # a part a killed run was writing
            shutil.rmtree(leftover, ignore_errors=True)

    # --- what is saved ---------------------------------------------------------------------

    def saved(self) -> List[Saved]:
        """The joined dataset first, then the parts in the order they were saved."""
        found = []
        rows = read_rows(self.layout.final_rows)
        if rows is not None and (self.layout.root / "state.json").is_file():
            found.append(Saved(self.layout.root, *rows))
        for part in sorted(self.layout.parts.glob(f"{PART}*")) if self.layout.parts.is_dir() else []:
            rows = read_rows(part / ROWS_FILE)
            if rows is not None:
                found.append(Saved(part, *rows))
        return found

    def done_ids(self) -> set:
        done = set()
        for saved in self.saved():
            done.update(saved.ids)
        rows = read_rows(self.layout.joining / ROWS_FILE)  # a join the last run did not put in place
        if rows is not None:
            done.update(rows[0])
        return done

    def recorded(self, done: set) -> Dict[str, dict]:
        """Captions in captions.jsonl whose rows are in no part (a killed run's last rows)."""
        found: Dict[str, dict] = {}
        try:
            lines = self.layout.captions_jsonl.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return found
        for line in lines:
            try:
                record = json.loads(line)
                row_id = str(record["id"])
            except (ValueError, KeyError, TypeError, RecursionError):
                continue  # a torn last line, or one damaged by hand
            if row_id not in done and isinstance(record.get("caption"), str):
                found[row_id] = record
        return found

    def record(self, record: dict) -> None:
        """One caption's line in captions.jsonl (called in a thread)."""
        with open(self.layout.captions_jsonl, "a", encoding="utf-8") as handle:
            handle.write(redact(json_text(record)) + "\n")

    # --- writing ---------------------------------------------------------------------------

    def save_part(self, build: Callable[[], object], ids: List[str], indices: List[int]) -> Path:
        """Build and save one part, whole or not at all (called in a thread)."""
        with self.saving:
            numbers = [int(path.name[len(PART):]) for path in self.layout.parts.glob(f"{PART}*")
                       if path.name[len(PART):].isdigit()]
            name = f"{PART}{max(numbers, default=0) + 1:06d}"
            temp = self.layout.parts / f".{name}"
            shutil.rmtree(temp, ignore_errors=True)
            build().save_to_disk(str(temp))
            write_rows(temp / ROWS_FILE, ids, indices)
            _fsync_tree(temp)
            os.replace(temp, self.layout.parts / name)
            return self.layout.parts / name

    def join(self, library) -> Optional[int]:
        """Join the parts and the dataset joined before into the dataset at output_path; the
        rows it holds, or None when there was nothing to join."""
        saved = self.saved()
        if not any(entry.path != self.layout.root for entry in saved):
            return None
        joined, ids, indices = join_saved(saved, library)
        temp = self.layout.joining
        shutil.rmtree(temp, ignore_errors=True)
        joined.save_to_disk(str(temp))
        _fsync_tree(temp)
        write_rows(temp / ROWS_FILE, ids, indices)
        del joined  # it maps the files about to be replaced
        self.finish_join()
        return len(ids)

    def finish_join(self) -> None:
        """Put a written join in place (again, after a kill: every step may be repeated)."""
        temp, root = self.layout.joining, self.layout.root
        rows = read_rows(temp / ROWS_FILE)
        if rows is None:
            shutil.rmtree(temp, ignore_errors=True)  # cut short before it was whole: the parts are still there
            return
        self.layout.final_rows.unlink(missing_ok=True)
        for old in [root / name for name in DATASET_FILES] + sorted(root.glob("data-*.arrow")):
            old.unlink(missing_ok=True)
        files = sorted((file for file in temp.iterdir() if file.name != ROWS_FILE),
                       key=lambda file: (file.name == "state.json", file.name))
        for file in files:
            _link(file, root / file.name)
        write_rows(self.layout.final_rows, *rows)
        for part in self.layout.parts.glob(f"{PART}*"):
            shutil.rmtree(part, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


def join_saved(saved: List[Saved], library) -> Tuple[object, List[str], List[int]]:
    """One dataset of the saved ones, in the source's row order, the newest row per id."""
    datasets = aligned([library.load_from_disk(str(entry.path)) for entry in saved], library)
    newest: Dict[str, Tuple[int, int]] = {}
    offset = 0
    for entry, dataset in zip(saved, datasets):
        for position, (row_id, index) in enumerate(zip(entry.ids, entry.indices)):
            newest[row_id] = (index, offset + position)
        offset += len(dataset)
    order = sorted(newest.items(), key=lambda item: item[1])
    joined = library.concatenate_datasets(datasets).select([position for _, (_, position) in order])
    return joined, [row_id for row_id, _ in order], [index for _, (index, _) in order]


def aligned(datasets: List, library) -> List:
    """The same columns in each (a column one lacks added empty), in the first one's types."""
    columns: Dict[str, object] = {}
    for dataset in datasets:
        for name, feature in dataset.features.items():
            if name not in columns or getattr(columns[name], "dtype", None) == "null":
                columns[name] = feature
    result = []
    for dataset in datasets:
        for name in columns:
            if name not in dataset.column_names:
                dataset = dataset.add_column(name, [None] * len(dataset))
        features = library.Features({name: columns[name] for name in columns})
        dataset = dataset.select_columns(list(columns))
        result.append(dataset if dataset.features == features else dataset.cast(features))
    return result


# --- joining the outputs of several shards ----------------------------------------------------


def join_outputs(outputs: List[Path], into: Path) -> int:
    """The shards' datasets as one at `into`, which a later run can use as its output_path
    (its failures.jsonl lists every shard's failed rows, for `--retry-failed`)."""
    from tagcaption.hf_dataset import require_datasets

    library = require_datasets()
    library.disable_progress_bars()
    if into.exists() and any(into.iterdir()):
        raise ConfigError(f"--into {into} is not empty: name a new folder")
    saved = []
    for output in outputs:
        layout = DatasetLayout(output)
        rows = read_rows(layout.final_rows)
        if rows is None or any(layout.parts.glob(f"{PART}*")):
            raise ConfigError(f"{output} is not a finished dataset output (no joined dataset, or parts not yet "
                              "joined): rerun that shard's command to finish it")
        saved.append(Saved(output, *rows))
    joined, ids, indices = join_saved(saved, library)
    target = DatasetLayout(into)
    joined.save_to_disk(str(into))
    target.state_dir.mkdir(exist_ok=True)
    write_rows(target.final_rows, ids, indices)
    atomic_write_text(target.info, json.dumps({"dataset": "joined", "shard": "1/1"}) + "\n")
    for name in ("failures", "captions"):
        lines = []
        for output in outputs:
            files = sorted(output.glob("failures*.jsonl")) if name == "failures" else [output / CAPTIONS_FILE]
            lines += [file.read_text(encoding="utf-8") for file in files if file.is_file()]
        atomic_write_text(target.failures if name == "failures" else target.captions_jsonl, "".join(lines))
    return len(ids)


def main(argv: Optional[List[str]] = None) -> int:
    """`caption.py join OUT... --into JOINED`."""
    parser = argparse.ArgumentParser(prog="caption.py join",
                                     description="Join the dataset outputs of several --shard runs into one dataset.")
    parser.add_argument("outputs", nargs="+", type=Path, metavar="OUTPUT_PATH")
    parser.add_argument("--into", required=True, type=Path, metavar="FOLDER")
    args = parser.parse_args(argv)
    try:
        count = join_outputs([path.resolve() for path in args.outputs], args.into.resolve())
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the library's own errors (a damaged output): one line
        print(f"error: cannot join: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"Joined {count} rows of {len(args.outputs)} outputs into {args.into} (open it with load_from_disk)")
    return 0
