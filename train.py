"""Trains a digit-sequence reader: `python train.py [--preset default|seed] [flags]`.

Reads stitched sequences from `pipeline`, trains a `model.networks` preset with optax (loss: the
softmax cross-entropies of the positions, summed), validates every epoch, and keeps in the
workdir: config.json, metrics.jsonl, checkpoints/ (orbax), tensorboard/ and model.h5.

Rerunning the same command continues from the latest checkpoint. Batch n of the pipeline and
the dropout key of step n are pure functions of (seed, n), so a resumed run ends — on CPU —
with parameters bit-identical to an uninterrupted one.
"""

from __future__ import annotations

# isort: off
import os
import signal

signal.signal(signal.SIGINT, lambda *_: os._exit(130))  # Ctrl-C while the libraries load: no traceback
import pipeline  # noqa: F401  (first: configures TensorFlow's logging and threads before it loads)

# isort: on
import argparse
import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import tensorflow as tf
from flax import serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from model import distributed, keras_h5, metrics, trained, training
from model import networks as nets
from model.checkpoints import BEST_METRIC, Checkpoints, SaveError, storage_failure
from model.recipes import ACCELERATOR_ENSEMBLE, CHECKPOINT_MINUTES, RECIPES, RESUME_KEYS, STREAMING_EPOCH, Recipe
from model.workdir import Workdir
from pipeline import flags
from pipeline.mnist import load_pool
from pipeline.sequences import SequenceConfig, eval_batches, numpy_batches, numpy_stacks, train_batches

PROG = "train.py"
EVAL_BATCH = 1000
# What a workdir's config.json means by a key it lacks: it was written before ensembles (one network),
# layouts (cells) and distortions (none) existed.
RECORDED_BEFORE = {"ensemble": 1, "layout": "cells", "distortions": []}


def _rerun(reason: str) -> str:
    when = "once there is room" if "no space left" in reason else "once that is put right"
    return f"{when}, rerun the same command to continue"


class TrainingStopped(Exception):
    """Training cannot go on (e.g. the loss became NaN); the message says why."""


# --- the loop ----------------------------------------------------------------------------------


class Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP (the terminal closed) set a flag the loop checks after each step
    (a second Ctrl-C aborts)."""

    def __init__(self):
        self.signal: int | None = None
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        self.previous = {s: signal.signal(s, self.handle) for s in signals}

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class Run:
    """One training run in its workdir: devices, data, state, checkpoints, logs."""

    def __init__(self, config: Recipe, workdir: Path, data_dir: str | None, mnist_dir: str | None, resume: bool):
        self.started = time.monotonic()  # --time-budget counts from here: compilation and data included
        self.config, self.workdir = config, Workdir(workdir)
        self.preset = nets.get_preset(config.preset)
        self.image_shape = self.preset.image_shape(config.max_digits, config.image_size)
        self.network = nets.build(self.preset, config.max_digits, config.ensemble)
        self.optimizer = config.optimizer()

        devices = jax.device_count()  # of all processes
        if config.batch_size % devices:
            raise ValueError(f"batch size {config.batch_size} does not split over {devices} devices")
        mesh = distributed.data_mesh()
        self.replicated = NamedSharding(mesh, P())
        self.sharded = NamedSharding(mesh, P("data"))
        self.stacked = NamedSharding(mesh, P(None, "data"))  # [S, B, ...]: several steps' batches
        self.eval_batch = math.ceil(EVAL_BATCH / devices) * devices
        self.main = distributed.is_main()

        self.sequences = SequenceConfig.delivering(
            config.max_digits, self.image_shape, config.augment, config.layout, config.distortions
        )
        # Validation is never augmented nor distorted: it chooses checkpoints for MNIST's own hand.
        self.val_sequences = dataclasses.replace(self.sequences, augment=False, distortions=())
        self._prepare_workdir(resume)
        self.train_pool = load_pool("train", data_dir, mnist_dir)
        self.val_pool = load_pool(config.validate_on, data_dir, mnist_dir)
        self.checkpoints = Checkpoints(self.workdir.checkpoints, writer=True)
        self.state = self._initial_state()
        self.saved_at = time.monotonic()  # without --checkpoint-every, checkpoints are CHECKPOINT_MINUTES apart
        self.step_fn = training.jit_train_step(
            self.network, self.optimizer, config.seed, config.label_smoothing,
            in_shardings=(self.replicated, self.stacked, self.replicated), out_shardings=self.replicated,
        )  # fmt: skip
        self.tensorboard = tf.summary.create_file_writer(str(self.workdir.tensorboard)) if self.main else None

    # -- workdir --

    def _prepare_workdir(self, resume: bool) -> None:
        workdir = self.workdir
        if workdir.is_foreign():
            raise ValueError(f"{workdir} is not empty and holds no digitseq run; pick a new or empty --workdir")
        if self.main:  # one run at a time per workdir (the processes of one run share process 0's lock)
            self.lock = workdir.lock()
            workdir.remove_partials()
        has_run = workdir.has_checkpoint()
        if has_run and resume and workdir.holds_a_run():
            saved = RECORDED_BEFORE | workdir.read_config()
            self.network = self._recorded_network(saved)
            ours = self._config_json()
            keys = RESUME_KEYS + (("epochs",) if ours["schedule"] != "constant" else ())  # epochs shape the schedule
            changed = [k for k in keys if saved.get(k) != ours.get(k)]
            if changed:
                was = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
                raise ValueError(
                    f"{workdir} holds a run trained with {was}; to continue it pass the same values, "
                    "or start over with --no-resume (discards it), or pick another --workdir"
                )
            if self.network.layers != self.preset.layers:  # said once the run is sure to continue
                self.note(f"{workdir} continues with the network it recorded, not today's {self.preset.name} preset")
        if resume and not has_run and workdir.model.is_file():
            raise ValueError(
                f"{workdir} holds a model.h5 but no checkpoint to continue from; to train again from the start "
                "pass --no-resume (discards model.h5 and metrics.jsonl), or pick another --workdir"
            )
        if self.main:
            if not (has_run and resume):  # a fresh start: nothing of an earlier run may linger
                workdir.clear_run()
            workdir.write_config(self._config_json())
        distributed.barrier("workdir prepared")

    def _recorded_network(self, saved: dict) -> nets.Network:
        """A run continues with the network it started with, even if its preset has changed since."""
        variables = None
        if "layers" not in saved:  # recorded before networks were: its checkpoint must fit today's preset
            found = Checkpoints(self.workdir.checkpoints).restore_good(note=self.note)
            variables = found[1] if found else nets.init_variables(self.network, self.image_shape, 0)
        return trained.recorded_network(self.workdir, saved, variables)

    def _config_json(self) -> dict:
        out = dataclasses.asdict(self.config)
        out["image_size"] = list(self.image_shape)
        out["distortions"] = list(self.config.distortions)
        out["layers"] = nets.layers_to_json(self.network.layers)
        out["devices"] = jax.device_count()
        out["processes"] = jax.process_count()
        return out

    def _initial_state(self) -> training.TrainState:
        variables = nets.init_variables(self.network, self.image_shape, self.config.seed)
        state = training.create_state(variables, self.optimizer, self.config.max_digits)
        state = jax.device_put(state, self.replicated)
        template = serialization.to_state_dict(state)
        found = self.checkpoints.restore_good(template, note=self.note)  # the newest intact checkpoint
        if found is None:
            return state
        step, restored = found
        if self.main:
            print(f"{PROG}: resuming {self.workdir} at step {step}", flush=True)
            self.workdir.trim_metrics(step)  # the steps after it will be redone
        return serialization.from_state_dict(state, restored)

    def note(self, line: str) -> None:
        if self.main:
            print(f"{PROG}: note: {line}", file=sys.stderr, flush=True)

    # -- data --

    def batches(self, start_step: int) -> Iterator[tuple[dict, jax.Array]]:
        """(stack, index) for each step from start_step on: the step trains on batch `index` of the stack.

        Each tf.data element, several consecutive steps' batches, goes to the devices whole and one
        element ahead of the steps that read it: no step waits for, or pays, a transfer of its own.
        """
        config = self.config
        stream = train_batches(
            self.train_pool,
            self.sequences,
            batch_size=config.batch_size,
            seed=config.seed,
            num_examples=config.train_examples,
            start_step=start_step,
            shard=(jax.process_index(), jax.process_count()),  # this process's rows (see distributed.data_mesh)
        )
        stacks = numpy_stacks(stream)

        def on_devices(stack: dict) -> dict:
            return {name: jax.make_array_from_process_local_data(self.stacked, a) for name, a in stack.items()}

        ahead = on_devices(next(stacks))
        indices = [np.int32(i) for i in range(ahead["labels"].shape[0])]
        indices = [jax.make_array_from_process_local_data(self.replicated, i) for i in indices]
        while True:
            stack, ahead = ahead, on_devices(next(stacks))
            for index in indices:
                yield stack, index

    def validate(self) -> dict:
        data = eval_batches(
            self.val_pool, self.val_sequences, num_examples=self.config.val_examples,
            batch_size=self.eval_batch, seed=self.config.seed,
        )  # fmt: skip
        variables = self.state.variables
        quiet = None if self.main else True  # tqdm: None = only on a terminal
        progress = tqdm(total=self.config.val_examples, desc="validating", unit="seq", leave=False, disable=quiet)
        figures = metrics.evaluate(
            self.network, variables, numpy_batches(data), self.eval_batch, self.sharded, progress.update
        )
        progress.close()
        return figures

    # -- saving --

    def host_variables(self) -> dict:
        return jax.device_get(self.state.variables)

    def check_finite(self) -> None:
        """Stops the run, before anything is saved, once the loss or any parameter is NaN or infinite."""
        loss = float(np.sum(jax.device_get(self.state.sums["loss"])))
        if not math.isfinite(loss):
            what = f"the loss became {loss}"
        elif not bool(jax.device_get(training.all_finite(self.state.variables))):
            what = "the parameters became NaN or infinite"
        else:
            return
        kept = self.checkpoints.latest_step()
        where = f"the last good checkpoint (step {kept}) is kept" if kept is not None else "no checkpoint was saved"
        raise TrainingStopped(
            f"{what} by step {int(self.state.step)}; training stopped and {where} in "
            f"{self.workdir.checkpoints} (try a smaller --learning-rate)"
        )

    @contextlib.contextmanager
    def writing(self, path: Path) -> Iterator[None]:
        """A failed write of `path` (disk full, …) stops the run in one sentence, like a failed checkpoint."""
        try:
            yield
        except OSError as error:
            kept = self.checkpoints.latest_step()
            intact = f"the checkpoint of step {kept} is intact" if kept is not None else "no checkpoint exists yet"
            reason = storage_failure(error)
            raise TrainingStopped(f"writing {path} failed ({reason}); {intact}; {_rerun(reason)}") from None

    def save(self, val_figures: dict | None = None) -> None:
        self.saved_at = time.monotonic()
        self.check_finite()
        step = int(self.state.step)
        if step in self.checkpoints.all_steps():
            return
        best = {BEST_METRIC: val_figures["sequence_accuracy"]} if val_figures else None
        try:
            self.checkpoints.save(step, serialization.to_state_dict(self.state), best)
        except SaveError as error:
            raise TrainingStopped(f"{error}; {_rerun(str(error))}") from None

    def write_model(self) -> None:
        if self.main:
            variables, step = self.host_variables(), int(self.state.step)
            with self.writing(self.workdir.model):
                keras_h5.write(
                    self.workdir.model, self.network, self.image_shape, variables, self.preset.name, step,
                    layout=self.config.layout,
                )  # fmt: skip

    def log_epoch(
        self, epoch: float, seconds: float, steps: int, steps_per_second: float | None, train: dict, val: dict
    ) -> None:
        if not self.main:
            return
        rate = None if steps_per_second is None else round(steps_per_second, 2)
        record = {"epoch": epoch, "step": int(self.state.step), "seconds": round(seconds, 3), "steps_per_second": rate}
        record |= metrics.flat(train) | metrics.flat(val, "val_")
        with self.writing(self.workdir.metrics_file):
            self.workdir.append_metrics(record)
        with self.tensorboard.as_default(step=record["step"]):
            for name, value in record.items():
                if name not in ("epoch", "step", "seconds") and value is not None:
                    tf.summary.scalar(name, value)
        self.tensorboard.flush()
        per_step = seconds / max(steps, 1) * 1000
        line = f"{seconds:.0f}s {per_step:.0f}ms/step - {metrics.keras_line(train)} - {metrics.keras_line(val, 'val_')}"
        print(line, flush=True)

    # -- training --

    def train(self) -> int:
        """Trains to the end, the time budget or a signal; returns the process exit status.

        One loop over steps; an epoch's start and end, periodic checkpoints, signals and the time
        budget are events in it. Every process sees the same events at the same step.
        """
        config, per_epoch = self.config, self.config.steps_per_epoch
        step, total = int(self.state.step), config.total_steps
        if step >= total:
            return self.already_trained(step)
        interrupts = Interrupts()
        batches = self.batches(step)
        budget = _Budget(self.started, config.time_budget, finish_seconds=config.val_examples / 1000)
        estimate = _Estimate(step, total, self.main)
        epoch = None  # the epoch in progress, once this invocation has begun one
        try:
            while True:
                if epoch is None or step % per_epoch == 0:  # an epoch begins (or resumes, mid-way)
                    epoch = _Epoch(step // per_epoch, step, per_epoch, self.main)
                    if self.main:
                        print(f"Epoch {epoch.number + 1}/{config.epochs}", flush=True)
                    if step % per_epoch == 0:  # its figures start from zero, resumed or not
                        zeros = jax.device_put(metrics.zeros(config.max_digits), self.replicated)
                        self.state = self.state.replace(sums=zeros)

                self.state = self.step_fn(self.state, *next(batches))
                step += 1
                if step == estimate.first:  # the first step compiled: the epoch's rate counts from its end
                    jax.block_until_ready(self.state.step)
                    epoch.clock(step)
                estimate.after(step, self.state)
                epoch.bar.advance(step - epoch.number * per_epoch, self.state)
                save_due = time.monotonic() - self.saved_at > CHECKPOINT_MINUTES * 60
                signalled, late, save_due = distributed.any_process(
                    step, interrupts.signal is not None, budget.late(), save_due
                )

                if signalled:
                    epoch.bar.close()
                    self.save()
                    name = signal.Signals(interrupts.signal or signal.SIGTERM).name
                    if self.main:
                        print(f"{PROG}: {name}: saved step {step} in {self.workdir.checkpoints}; "
                              "rerun the same command to continue", file=sys.stderr, flush=True)  # fmt: skip
                    return 128 + (interrupts.signal or signal.SIGTERM)
                if step % per_epoch == 0 or step == total or late:
                    with budget.finishing():
                        self.end_epoch(epoch, step)
                    if late:
                        if self.main:
                            print(f"{PROG}: the time budget of {config.time_budget:g} min is spent: stopped at step "
                                  f"{step} of {total}, everything saved; rerun the same command to go on")  # fmt: skip
                        return 0
                    if step == total:
                        break
                elif (step % config.checkpoint_every == 0) if config.checkpoint_every else save_due:
                    self.save()
            if interrupts.signal is not None:  # it came while the last epoch was being finished
                if self.main:
                    print(f"{PROG}: {signal.Signals(interrupts.signal).name} while finishing: the run is complete "
                          f"and saved at step {step}", file=sys.stderr, flush=True)  # fmt: skip
                return 128 + interrupts.signal
        finally:
            interrupts.restore()
        if self.main:
            print(f"{PROG}: done at step {step}; model: {self.workdir.model}", flush=True)
        return 0

    def end_epoch(self, epoch: _Epoch, step: int) -> None:
        """Validates, logs, checkpoints and writes model.h5 (also at a stop before the epoch's end)."""
        epoch.bar.close()
        self.check_finite()  # waits for the last step
        steps_per_second = epoch.steps_per_second(step)
        train_figures = metrics.summarize(self.state.sums)
        val_figures = self.validate()
        seconds = time.perf_counter() - epoch.started
        done = round(step / self.config.steps_per_epoch, 4)
        self.log_epoch(done, seconds, step - epoch.first_step, steps_per_second, train_figures, val_figures)
        self.save(val_figures)
        self.write_model()

    def already_trained(self, step: int) -> int:
        # Bring model.h5 up to the checkpoint: a kill or a full disk between the two can leave it behind.
        if self.main and keras_h5.recorded_step(self.workdir.model) != step:
            self.write_model()
            print(f"{PROG}: wrote {self.workdir.model} of step {step} (it was missing or older)", flush=True)
        if self.main:
            print(f"{PROG}: {self.workdir} is already trained to step {step}; nothing to do", flush=True)
        return 0


class _Epoch:
    """The epoch in progress: its number, where this invocation began it, its progress bar."""

    def __init__(self, number: int, first_step: int, per_epoch: int, shown: bool):
        self.number, self.first_step = number, first_step
        self.started = time.perf_counter()
        self.bar = _progress(per_epoch, first_step - number * per_epoch, shown)
        self.clock(first_step)

    def clock(self, step: int) -> None:
        """The loop's rate counts from here (the end of `step`)."""
        self.clock_step, self.clock_started = step, time.perf_counter()

    def steps_per_second(self, step: int) -> float | None:
        """Of the loop from the clock to `step` (finished): data, steps, periodic checkpoints, progress."""
        seconds = time.perf_counter() - self.clock_started
        return (step - self.clock_step) / seconds if step > self.clock_step else None


class _Estimate:
    """One line early in a run: the time its remaining steps take at the rate measured over steps
    2–21 of this invocation (the first compiles), validation left out."""

    SAMPLE = 20

    def __init__(self, step: int, total: int, shown: bool):
        self.first, self.total, self.shown = step + 1, total, shown

    def after(self, step: int, state: training.TrainState) -> None:
        if not self.shown or step not in (self.first, self.first + self.SAMPLE) or step >= self.total:
            return
        jax.block_until_ready(state.step)  # twice a run: the steps are dispatched ahead otherwise
        if step == self.first:
            self.started = time.perf_counter()
            return
        rate = self.SAMPLE / (time.perf_counter() - self.started)
        seconds = (self.total - step) / rate
        took = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
        took = took if seconds < 7200 else f"{seconds / 3600:.1f} h"
        print(f"{PROG}: about {took} for the {self.total - step:,} steps left ({rate:.1f} steps/s)", flush=True)


class _Budget:
    """--time-budget: late once the time left would not cover finishing (validate, save, write), as
    long as the last finish took."""

    def __init__(self, started: float, minutes: float | None, finish_seconds: float):
        self.deadline = None if minutes is None else started + 60 * minutes
        self.finish_seconds = finish_seconds

    def late(self) -> bool:
        return self.deadline is not None and time.monotonic() + self.finish_seconds > self.deadline

    @contextlib.contextmanager
    def finishing(self) -> Iterator[None]:
        began = time.perf_counter()
        yield
        self.finish_seconds = time.perf_counter() - began


class _progress:
    """A tqdm bar on a terminal; otherwise a plain line at every tenth of the epoch."""

    def __init__(self, total: int, done: int, shown: bool = True):
        self.total, self.done, self.shown = total, done, shown
        terminal = shown and sys.stdout.isatty()
        self.bar = tqdm(total=total, initial=done, unit="step", dynamic_ncols=True) if terminal else None
        self.started, self.last_fetch = time.perf_counter(), 0.0

    def advance(self, done: int, state: training.TrainState) -> None:
        now = time.perf_counter()
        tenth = max(1, self.total // 10)
        if self.bar is not None:
            self.bar.update(done - self.bar.n)
            if now - self.last_fetch > 0.5:  # fetching the loss waits for the step: not every step
                self.last_fetch = now
                self.bar.set_postfix(loss=f"{_running_loss(state):.4f}", refresh=False)
        elif self.shown and (done % tenth == 0 or done == self.total):
            rate = (done - self.done) / max(now - self.started, 1e-9)
            print(f"  {done}/{self.total} - {rate:.1f} steps/s - loss: {_running_loss(state):.4f}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _running_loss(state: training.TrainState) -> float:
    sums = jax.device_get(state.sums)
    return float(np.sum(sums["loss"]) / max(float(sums["examples"]), 1.0))


# --- command line ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = flags.ArgumentParser(
        prog=PROG,
        description="Train a digit-sequence reader and keep everything in its workdir "
        "(config.json, metrics.jsonl, checkpoints/, tensorboard/, model.h5). Rerunning the same "
        "command resumes. A flag left out takes the value of the preset's recipe (model/recipes.py), shown with it.",
    )

    def recipe(name: str) -> str:
        def word(value) -> str:
            if isinstance(value, bool):
                return "on" if value else "off"
            if isinstance(value, tuple):
                return ",".join(value) or "none"
            return ("streaming" if name == "train_examples" else "none") if value is None else str(value)

        values = {preset: word(getattr(r, name)) for preset, r in RECIPES.items()}
        if len(set(values.values())) == 1:
            return f"(default: {values['default']})"
        return "[" + "; ".join(f"{preset}: {value}" for preset, value in values.items()) + "]"

    parser.add_argument(
        "--preset", choices=list(nets.PRESETS),
        help="network and recipe (default: on a CPU, default; on a GPU or TPU, accurate as an ensemble of "
        f"{ACCELERATOR_ENSEMBLE}; continuing a workdir, the one it records): "
        + "; ".join(f"{p.name}: {p.summary}" for p in nets.PRESETS.values()),
    )  # fmt: skip
    parser.add_argument(
        "--ensemble", type=flags.positive_int, metavar="N",
        help="train N networks of the preset in one step, each with its own initial weights and dropout; "
        f"the model is their mean probabilities (one Keras model in model.h5) {recipe('ensemble')}",
    )  # fmt: skip
    parser.add_argument("--epochs", type=flags.positive_int, help=f"epochs to train {recipe('epochs')}")
    parser.add_argument(
        "--batch-size", type=flags.positive_int, help=f"global batch, split over the devices {recipe('batch_size')}"
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument(
        "--train-examples", type=flags.positive_int,
        help=f"train on a fixed set of this many sequences, reshuffled every epoch {recipe('train_examples')}",
    )  # fmt: skip
    data.add_argument(
        "--streaming", action="store_true",
        help=f"fresh sequences every step; an epoch is then {STREAMING_EPOCH:,} sequences",
    )  # fmt: skip
    parser.add_argument(
        "--learning-rate", type=float, help=f"Adam learning rate (the peak, with cosine) {recipe('learning_rate')}"
    )
    parser.add_argument(
        "--schedule", choices=["constant", "cosine"],
        help="learning rate over the planned epochs: constant, or a 5 %% warm-up then cosine decay to 0 "
        f"{recipe('schedule')}",
    )  # fmt: skip
    parser.add_argument(
        "--label-smoothing", type=float, metavar="EPS",
        help=f"train towards (1-EPS)*one-hot + EPS/11 {recipe('label_smoothing')}",
    )  # fmt: skip
    parser.add_argument(
        "--augment", action=argparse.BooleanOptionalAction,
        help=f"cells: shift each digit by up to ±2 px; free: jitter the frame (±5 %% scale, ±1 px) {recipe('augment')}",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, help=f"seeds data, initial weights, dropout {recipe('seed')}")
    parser.add_argument("--workdir", type=Path, help="where the run lives (default: runs/<preset>)")
    parser.add_argument(
        "--max-steps", type=flags.positive_int, help=f"stop after this many steps in all {recipe('max_steps')}"
    )
    parser.add_argument(
        "--time-budget", type=flags.positive_minutes, metavar="MINUTES",
        help="stop cleanly, validated and saved, within this many minutes of wall time (counted after "
        "Python's imports, so compilation and data preparation are included); rerunning continues "
        f"{recipe('time_budget')}",
    )  # fmt: skip
    parser.add_argument(
        "--resume", action=argparse.BooleanOptionalAction, default=True,
        help="continue the workdir's run (default); --no-resume discards its checkpoints, metrics and model.h5 "
        "and starts over",
    )  # fmt: skip
    parser.add_argument(
        "--validate-on", choices=["validation", "test"],
        help="digits of the per-epoch validation sequences: held-out train digits, or MNIST test "
        f"(the notebook's choice; then test figures are no longer untouched) {recipe('validate_on')}",
    )  # fmt: skip
    parser.add_argument(
        "--val-examples", type=flags.positive_int, help=f"validation sequences an epoch {recipe('val_examples')}"
    )
    parser.add_argument(
        "--checkpoint-every", type=flags.positive_int,
        help="steps between periodic checkpoints (default: one every "
        f"{CHECKPOINT_MINUTES:g} min of wall time); also saved at every epoch end and on Ctrl-C, SIGTERM or SIGHUP",
    )  # fmt: skip
    flags.add_data_flags(parser)
    flags.add_sequence_flags(parser, layout_default=recipe("layout"), distortions_default=recipe("distortions"))
    parser.set_defaults(max_digits=None, layout=None, distortions=None)  # the recipe's
    group = parser.add_argument_group(
        "many processes (jax.distributed)",
        "Start one train.py per host (or per device group), each with the same flags and its own "
        "--process-id; together they train one model on all their devices, data parallel.",
    )
    group.add_argument(
        "--coordinator", metavar="HOST:PORT", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
        help="address of process 0, which every process connects to (default: $JAX_COORDINATOR_ADDRESS)",
    )  # fmt: skip
    group.add_argument(
        "--num-processes", type=flags.positive_int, default=flags.env_int("JAX_NUM_PROCESSES"),
        help="how many processes take part (default: $JAX_NUM_PROCESSES)",
    )  # fmt: skip
    group.add_argument(
        "--process-id", type=flags.whole_number, default=flags.env_int("JAX_PROCESS_ID"),
        help="this process's number, 0 .. N-1; 0 writes the logs and model.h5 (default: $JAX_PROCESS_ID)",
    )  # fmt: skip
    group.add_argument(
        "--distributed", action="store_true",
        help="join a multi-process run whose settings JAX detects itself (SLURM, Open MPI, Kubernetes, Cloud TPU)",
    )  # fmt: skip
    return parser.parse_args(argv)


def chosen_preset(args: argparse.Namespace, backend: str) -> tuple[str, dict, str]:
    """The preset when --preset is left out, recipe values that come with it (flags given still win),
    and why: the run a given --workdir records (its ensemble and layout too), else the accurate ensemble
    on an accelerator, else the default."""
    if args.workdir is not None and args.resume:
        workdir = Workdir(args.workdir)
        if workdir.holds_a_run():
            saved = RECORDED_BEFORE | workdir.read_config()
            if saved.get("preset") in RECIPES:
                recorded = {key: saved[key] for key in RECORDED_BEFORE}
                return saved["preset"], recorded, f"the preset {args.workdir} records"
    if backend != "cpu":
        why = f"on {backend}: the accurate preset (--preset default for the CPU recipe)"
        return "accurate", {"ensemble": ACCELERATOR_ENSEMBLE}, why
    return "default", {}, ""


def config_from_args(args: argparse.Namespace, backend: str = "cpu") -> tuple[Recipe, str]:
    """The preset's recipe with the flags that were given put in place of its values, and a line saying
    what was chosen and why when --preset was left out ("" for the CPU default)."""
    fields = {field.name for field in dataclasses.fields(Recipe)}
    given = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    if args.streaming:
        given["train_examples"] = None
    reason = ""
    if args.preset is None:
        preset, extra, why = chosen_preset(args, backend)
        given = {"preset": preset, **extra, **given}
        if why:
            members = given.get("ensemble", RECIPES[preset].ensemble)
            what = f"an ensemble of {members}" if members > 1 else "one network"
            reason = f"{PROG}: training {preset}, {what}: {why}"
    config = dataclasses.replace(RECIPES[given["preset"]], **given)
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise ValueError(f"--learning-rate must be positive and finite, not {config.learning_rate}")
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), not {config.label_smoothing}")
    if config.train_examples is not None and config.train_examples < config.batch_size:
        raise ValueError(f"--train-examples {config.train_examples} cannot fill one batch of {config.batch_size}")
    return config, reason


def main() -> None:
    args = parse_args()
    config_from_args(args)  # the flags' mistakes, before anything starts
    if args.process_id is not None and args.num_processes is not None and args.process_id >= args.num_processes:
        raise ValueError(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")
    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.distributed)
        config, reason = config_from_args(args, jax.default_backend())  # the backend is known once JAX started
        if reason and distributed.is_main():
            print(reason, flush=True)
        workdir = args.workdir or Path("runs") / config.preset
        status = Run(config, workdir, args.data_dir, args.mnist_dir, args.resume).train()
    except (TrainingStopped, distributed.DistributedError) as error:
        print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        flags.quiet_stderr()  # what failed, failed: orbax's winding-down threads may still print tracebacks
        sys.exit(1)
    sys.exit(status)


if __name__ == "__main__":
    flags.run(main, PROG)
