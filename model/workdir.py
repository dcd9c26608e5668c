"""Everything a training run leaves on disk, and the one way each piece is written and read.

    WORKDIR/config.json     the run's settings (resume continues only under the same ones)
    WORKDIR/metrics.jsonl   one JSON line per epoch end
    WORKDIR/checkpoints/    orbax (model/checkpoints.py)
    WORKDIR/tensorboard/    the same figures for TensorBoard
    WORKDIR/model.h5        the Keras file (model/keras_h5.py)
    WORKDIR/start.h5        of a run on a user's numbers from --init-from: the model it started from with
                            the judge of the user's hand (model/judge.py); model.h5 and the checkpoints
                            are read with it
    WORKDIR/.lock           held by the train.py that owns the workdir
    WORKDIR/crash.txt       only after a crash: what each thread was doing (startup.py)

Every file is written whole or not at all (`atomic_write`), so a kill or a full disk leaves the
previous version in place. A damaged file is named in the error, with what to do.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
MODEL = "model.h5"
START = "start.h5"
LOCK = ".lock"
CRASH = "crash.txt"
_PARTIAL = ".{name}.partial"

# What a config.json means by a key it lacks: it was written before ensembles (one network), layouts
# (cells), distortions (none) and weight decay (none) existed. The one place these defaults live (model.h5
# reads so too).
RECORDED_BEFORE = {"ensemble": 1, "layout": "cells", "distortions": [], "weight_decay": 0.0}


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Writes `data` to `path` through a hidden partial file renamed into place when complete.

    On any failure (disk full, kill) the previous file stays as it was and the partial is removed;
    after a kill -9 it is left, and the next write of `path` replaces it.
    """
    path = Path(path)
    partial = path.with_name(_PARTIAL.format(name=path.name))
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(partial, "wb") as file:
            file.write(payload)
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise


def read_json(path: Path) -> dict:
    """A JSON file as a dict; a damaged one is named in a ValueError."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is damaged (not valid JSON: {error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path} is damaged (expected a JSON object)")
    return value


class Workdir:
    """The paths of one run's folder, and its config and metrics."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.config_file = self.path / CONFIG
        self.metrics_file = self.path / METRICS
        self.checkpoints = self.path / CHECKPOINTS
        self.tensorboard = self.path / TENSORBOARD
        self.model = self.path / MODEL
        self.start_model = self.path / START
        self.crash_file = self.path / CRASH

    def __str__(self) -> str:
        return str(self.path)

    def holds_a_run(self) -> bool:
        return self.config_file.is_file()

    def is_foreign(self) -> bool:
        """A non-empty folder that no train.py wrote: never to be written into. (Its lock and a partial
        file are train.py's own: another process of the run may be writing config.json right now; a crash
        report is its own too.)"""
        if not self.path.is_dir() or self.holds_a_run():
            return False
        ours = (LOCK, _PARTIAL.format(name="*"), CRASH)
        return any(not any(fnmatch.fnmatch(p.name, pattern) for pattern in ours) for p in self.path.iterdir())

    def has_checkpoint(self) -> bool:
        return self.checkpoints.is_dir() and any(p.name.isdigit() for p in self.checkpoints.iterdir())

    # -- config.json --

    def read_config(self) -> dict:
        """config.json, with RECORDED_BEFORE's values for the keys a run recorded before they existed lacks."""
        if not self.config_file.is_file():
            raise ValueError(f"{self.path} is not a training workdir (no {CONFIG}); pass a folder train.py wrote")
        return RECORDED_BEFORE | read_json(self.config_file)

    def write_config(self, config: dict) -> None:
        atomic_write(self.config_file, json.dumps(config, indent=2) + "\n")

    # -- metrics.jsonl --

    def read_metrics(self) -> list[dict]:
        """The epoch records, oldest first ([] when there are none yet)."""
        if not self.metrics_file.is_file():
            return []
        records = []
        for number, line in enumerate(self.metrics_file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(
                    f"{self.metrics_file} is damaged at line {number}; remove that line (or the file) and rerun"
                ) from None
        return records

    def append_metrics(self, record: dict) -> None:
        earlier = self.metrics_file.read_text() if self.metrics_file.is_file() else ""
        atomic_write(self.metrics_file, earlier + json.dumps(record) + "\n")  # whole lines, even on a full disk

    def trim_metrics(self, step: int) -> None:
        """Drops the records of steps after `step` (a resumed run redoes them)."""
        records = self.read_metrics()
        kept = [r for r in records if r["step"] <= step]
        if len(kept) < len(records):
            atomic_write(self.metrics_file, "".join(json.dumps(r) + "\n" for r in kept))

    # -- the run's life --

    def clear_run(self) -> None:
        """Removes an earlier run's outputs (a fresh start); config.json is rewritten by the caller."""
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        shutil.rmtree(self.tensorboard, ignore_errors=True)
        self.metrics_file.unlink(missing_ok=True)
        self.model.unlink(missing_ok=True)
        self.start_model.unlink(missing_ok=True)

    def remove_partials(self) -> None:
        """Removes partial files a killed writer left (only while holding the lock)."""
        for partial in self.path.glob(_PARTIAL.format(name="*")):
            if partial.is_file():
                partial.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the workdir for one train.py: another is refused while this one runs (the OS lets go when
        the process exits, however it dies)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise ValueError(
                    f"{self.path} is in use by another train.py (pid {holder}); wait for it to finish, "
                    "or pick another --workdir"
                ) from None
            handle.truncate(0)
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
