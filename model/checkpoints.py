"""Training checkpoints with orbax-checkpoint: the latest few, and the best by validation.

A checkpoint is the whole training state as a nested dict (parameters, batch-norm statistics,
optimizer state, step, the running epoch's metric sums), saved synchronously: when `save`
returns, the step is on disk. Orbax writes into a temporary directory and renames it when
complete, so a save that dies half-way (kill -9, disk full) leaves the previous checkpoints as
they were; the writer removes such half-written leftovers when it opens the folder, and after a
failed save. Metrics passed with a save rank it for "best"; checkpoints saved without metrics
(periodic, mid-epoch) are kept only while they are among the latest.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

BEST_METRIC = "val_sequence_acc"
_PARTIAL = "*.orbax-checkpoint-tmp*"  # orbax's name for a save in progress


class SaveError(RuntimeError):
    """A checkpoint could not be written (disk full, …); the earlier ones are untouched."""


class Checkpoints:
    def __init__(self, directory: str | Path, keep_latest: int = 3, writer: bool = False):
        """`writer`: the training run, which also cleans up half-written saves (a reader must not:
        they may be the trainer's save in progress)."""
        self.directory = Path(directory).absolute()
        self.writer = writer
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=False,
            cleanup_tmp_directories=writer,
            best_fn=lambda metrics: metrics[BEST_METRIC],  # makes orbax store the metrics with a save
            best_mode="max",
            preservation_policy=policies.AnyPreservationPolicy(
                [
                    policies.LatestN(keep_latest),
                    policies.BestN(
                        get_metric_fn=lambda metrics: metrics[BEST_METRIC],
                        reverse=False,  # (keeps the n highest)
                        n=1,
                        keep_checkpoints_without_metrics=False,
                    ),
                ]
            ),
        )
        # Orbax lists the steps as it opens the folder: a trainer's clean-up can remove one meanwhile.
        self.manager = _listing(lambda: ocp.CheckpointManager(self.directory, options=options))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def best_step(self) -> int | None:
        """The kept step with the highest validation sequence accuracy (None if none was validated)."""
        scored = [(metrics[BEST_METRIC], step) for step in self.all_steps() if (metrics := self.metrics(step))]
        return max(scored)[1] if scored else None

    def metrics(self, step: int) -> dict[str, float] | None:
        return self.manager.metrics(step)

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Writes the checkpoint of `step`; raises SaveError, in one sentence, if the storage refuses."""
        kept = self.latest_step()
        try:
            with _quiet_orbax():
                self.manager.save(step, args=ocp.args.StandardSave(state), metrics=metrics, force=True)
                self.manager.wait_until_finished()
        except Exception as error:
            reason = storage_failure(error)
            if reason is None:
                raise
            if jax.process_index() == 0:
                self._remove_partial_saves()
            intact = f"the checkpoint of step {kept} is intact" if kept is not None else "no earlier checkpoint exists"
            raise SaveError(f"saving step {step} in {self.directory} failed ({reason}); {intact}") from None

    def _remove_partial_saves(self) -> None:
        """Removes what a failed save left. Orbax's writer threads may still be finishing (on a busy
        machine, after the error reached us) and write into a folder just removed: wait for them, then
        remove until nothing is left."""
        try:
            with _quiet_orbax():
                self.manager.wait_until_finished()
        except Exception:  # the same failure, reported again: it is already being reported
            pass
        for _ in range(50):
            partials = list(self.directory.glob(_PARTIAL))
            if not partials:
                return
            for partial in partials:
                shutil.rmtree(partial, ignore_errors=True)
            time.sleep(0.1)

    def restore(self, step: int, template: dict[str, Any] | None = None) -> dict[str, Any]:
        """The state saved at `step`, shaped and placed (sharded) like `template` (as saved without one)."""
        return self.manager.restore(step, args=ocp.args.StandardRestore(template))

    def restore_good(
        self, template: dict[str, Any] | None = None, prefer: int | None = None, note: Callable[[str], None] = print
    ) -> tuple[int, dict[str, Any]] | None:
        """The newest checkpoint that reads back whole with finite parameters: (step, state), or None if
        there is no checkpoint. `prefer` is tried first. A damaged one is skipped with a one-line `note`
        (the writer moves it aside to STEP.damaged, so that training does not meet it again); one that
        vanishes while read (the trainer's clean-up) is skipped silently.
        """
        tried: set[int] = set()
        while True:
            steps = sorted(set(_listing(self._reloaded_steps)) - tried, reverse=True)
            if prefer is not None and prefer in steps:
                steps.insert(0, steps.pop(steps.index(prefer)))
            if not steps:
                if tried:
                    raise ValueError(f"no checkpoint in {self.directory} can be read; start over with --no-resume")
                return None
            step = steps[0]
            tried.add(step)
            try:
                with _quiet_orbax():
                    state = self.restore(step, template)
            except FileNotFoundError:
                continue
            except Exception:  # orbax and tensorstore raise ValueError, OSError, Exception, …
                if not (self.directory / str(step)).is_dir():
                    continue  # removed while being read
                self._set_aside(step, "cannot be read (damaged or incomplete)", note)
                continue
            if not _finite(state):
                self._set_aside(step, "holds parameters that are not finite (NaN or inf)", note)
                continue
            return step, state

    def _reloaded_steps(self) -> list[int]:
        self.manager.reload()
        return self.all_steps()

    def _set_aside(self, step: int, why: str, note: Callable[[str], None]) -> None:
        where = self.directory / str(step)
        if self.writer and jax.process_index() == 0:
            aside = where.with_name(f"{step}.damaged")
            shutil.rmtree(aside, ignore_errors=True)
            where.rename(aside)
            note(f"checkpoint {where} {why}: moved aside to {aside.name}; using the one before")
        else:
            note(f"checkpoint {where} {why}; using the one before")

    def close(self) -> None:
        self.manager.close()


def _listing(list_steps: Callable[[], Any], attempts: int = 20) -> Any:
    """`list_steps()`, again while a checkpoint vanishes under it (the trainer removing an old one as
    orbax reads the folder: FileNotFoundError, or NotADirectoryError when it goes between orbax's
    `exists()` and `is_dir()`), and without orbax's warnings about the vanished one."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)  # "Metadata file does not exist: …/_CHECKPOINT_METADATA" of a removed step
    try:
        for attempt in range(attempts):
            try:
                return list_steps()
            except (FileNotFoundError, NotADirectoryError):
                if attempt == attempts - 1:
                    raise
                time.sleep(0.01 * (attempt + 1))
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Holds back what a save writes to stderr, and lets it through only if the save succeeds.

    A failed write makes orbax log tracebacks from its worker threads, and tensorstore's callbacks
    print more from C++ (straight to file descriptor 2); the raised error is what we report.
    """
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    sys.stderr.flush()
    saved_fd = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            yield
            held.seek(0)  # the save succeeded: let its messages through
            os.write(saved_fd, held.read())
            logger.setLevel(level)
        except BaseException:
            # Failed: its worker threads, pending asyncio tasks and tensorstore's callbacks may still
            # print tracebacks as they wind down, now or later ("Event loop is closed", "Exception
            # ignored in <coroutine …>"); the error is reported by the caller, so they stay quiet.
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            _drop_stragglers()
            gc.collect()  # most of them now, while stderr is still held
            # A thread may be halfway through a traceback: file descriptor 2 stays away from the
            # terminal for good, and Python's own stderr (the caller's one-line report) gets the original.
            sys.stderr.flush()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
            sys.stderr = os.fdopen(saved_fd, "w", buffering=1)
            raise
        sys.stderr.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def _drop_stragglers() -> None:
    """From now on, exceptions raised inside orbax or asyncio code that nobody awaits any more are
    not printed; every other one still is."""

    def straggler(error: BaseException | None) -> bool:
        frames = traceback.extract_tb(error.__traceback__) if error is not None else []
        return any("/orbax/" in f.filename or "/asyncio/" in f.filename for f in frames)

    unraisable, uncaught, in_thread = sys.unraisablehook, sys.excepthook, threading.excepthook
    sys.unraisablehook = lambda u: None if straggler(u.exc_value) else unraisable(u)
    sys.excepthook = lambda kind, error, tb: None if straggler(error) else uncaught(kind, error, tb)
    threading.excepthook = lambda args: None if straggler(args.exc_value) else in_thread(args)


def _finite(state: dict[str, Any]) -> bool:
    variables = [state.get("params", {}), state.get("batch_stats", {})]
    local = [x.addressable_data(0) if isinstance(x, jax.Array) else x for x in jax.tree.leaves(variables)]
    return all(bool(np.isfinite(np.asarray(x)).all()) for x in local)


def storage_failure(error: BaseException) -> str | None:
    """'no space left on the device' (or the OS's words) if `error` comes from the storage, else None.

    Orbax raises what tensorstore reports as ValueError('RESOURCE_EXHAUSTED: …'), or an OSError.
    """
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error)
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "RESOURCE_EXHAUSTED" in text:
            return "no space left on the device"
        if isinstance(error, OSError):
            return error.strerror or text
        if "PERMISSION_DENIED" in text:
            return "permission denied"
        error = error.__cause__ or error.__context__
    return None
