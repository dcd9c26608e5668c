"""The training loop: `train_and_evaluate(config, workdir, data)`, read top to bottom.

1. `start` opens the workdir by the resume rules (`open_workdir`): a fresh run, or the recorded one
   continued under the same settings. The network, the config.json record, the checkpoints and the
   initial state are each made once, there.
2. `train` runs the steps. An epoch's end (validate, log, checkpoint, model.h5), periodic
   checkpoints, signals and the time budget are events in one loop over steps, seen by every
   process at the same step.

The data comes in as `Data`: the training stacks from a step on and the validation batches, made
by the caller (train.py builds them with `pipeline`), so this module knows nothing of how.
Batch n and the dropout key of step n are pure functions of (seed, n): a resumed run ends, on a
CPU, with parameters bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import jax
import numpy as np
import tensorflow as tf
from flax import serialization
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from model import distributed, judge, keras_h5, metrics, trained, training
from model import networks as nets
from model.checkpoints import BEST_METRIC, Checkpoints, SaveError, storage_failure
from model.recipes import CHECKPOINT_MINUTES, RECIPES, RESUME_KEYS, Recipe
from model.workdir import RECORDED_BEFORE, Workdir

PROG = "train.py"  # the loop speaks as the command that runs it
EVAL_BATCH = 1000


Initial = Callable[[], trained.Trained]  # makes the model a fresh run starts from (fine-tuning)


class TrainingStopped(Exception):
    """Training cannot go on (the loss became NaN, a write failed); the message says why."""


@dataclasses.dataclass(frozen=True)
class Data:
    """What the loop trains and validates on. `train(start_step, shard)` yields stacks of consecutive steps'
    batches ({"image": uint8 [S, B, H, W, 1], "labels": int32 [S, B, K]}) from that step on, this process's
    rows of each (shard = (index, count)); `validation(batch_size)` the validation set's batches."""

    train: Callable[[int, tuple[int, int]], Iterator[dict]]
    validation: Callable[[int], Iterable[dict]]


def train_and_evaluate(
    config: Recipe, workdir: Path, data: Data, resume: bool = True, initial: Initial | None = None
) -> int:
    """Trains `config` in `workdir` to its end, its time budget or a signal; returns the exit status. A fresh
    run starts from the network and weights of the model `initial()` makes when given (fine-tuning; called
    only when the run starts afresh), else from the preset's. A judged model (model/judge.py) trains its
    fine-tuned network, kept with its start and judge in start.h5; model.h5 is then that judged model with
    the weights trained."""
    with start(config, workdir, resume, initial) as run:
        return train(run, data)


# --- the run: workdir, network, state --------------------------------------------------------------


@dataclasses.dataclass
class Run:
    config: Recipe
    workdir: Workdir
    network: nets.Network
    checkpoints: Checkpoints
    state: training.TrainState
    step_fn: Callable
    started: float  # --time-budget counts from here: compilation and data included
    main: bool = dataclasses.field(default_factory=distributed.is_main)
    saved_at: float = dataclasses.field(default_factory=time.monotonic)
    tensorboard: tf.summary.SummaryWriter | None = None  # process 0's, from its first epoch's end

    def say(self, line: str, stderr: bool = False) -> None:
        if self.main:
            print(line, file=sys.stderr if stderr else sys.stdout, flush=True)


def shardings() -> tuple[NamedSharding, NamedSharding, NamedSharding]:
    """Replicated, batch-sharded and stack-sharded ([S, B, ...]: several steps' batches) over all devices."""
    mesh = distributed.data_mesh()
    return NamedSharding(mesh, P()), NamedSharding(mesh, P("data")), NamedSharding(mesh, P(None, "data"))


@contextlib.contextmanager
def start(config: Recipe, path: Path, resume: bool, initial: Initial | None = None) -> Iterator[Run]:
    """The run in `path`, ready for its next step; its workdir stays locked (and its checkpoints open) inside."""
    started = time.monotonic()
    if config.batch_size % jax.device_count():
        raise ValueError(f"batch size {config.batch_size} does not split over {jax.device_count()} devices")
    workdir = Workdir(path)
    with contextlib.ExitStack() as stack:
        network, variables, checkpoints = stack.enter_context(open_workdir(config, workdir, resume, initial))
        replicated, _, stacked = shardings()
        optimizer = config.optimizer()
        step_fn = training.jit_train_step(
            network, optimizer, config.seed, config.label_smoothing,
            in_shardings=(replicated, stacked, replicated), out_shardings=replicated,
        )  # fmt: skip
        state = jax.device_put(training.create_state(variables, optimizer, config.max_digits), replicated)
        run = Run(config, workdir, network, checkpoints, state, step_fn, started)
        stack.callback(lambda: run.tensorboard and run.tensorboard.close())
        found = checkpoints.restore_good(serialization.to_state_dict(state), note=note)  # the newest intact
        if found is not None:
            step, restored = found
            run.say(f"{PROG}: resuming {workdir} at step {step}")
            if run.main:
                workdir.trim_metrics(step)  # the steps after it will be redone
            run.state = serialization.from_state_dict(state, restored)
        yield run


@contextlib.contextmanager
def open_workdir(
    config: Recipe, workdir: Workdir, resume: bool, initial: Initial | None = None
) -> Iterator[tuple[nets.Network, dict, Checkpoints]]:
    """The resume rules. A workdir holding someone else's files is refused. With a checkpoint and resume,
    the run continues with the network its config.json records, under the same RESUME_KEYS (and epochs,
    which shape a cosine schedule), or is refused in one sentence saying how to go on; a model.h5 without a
    checkpoint is not discarded without --no-resume. Otherwise the folder starts afresh. Yields the run's
    network, its initial variables and its checkpoints, config.json written, the workdir locked inside."""
    # Every process looks before any of them writes (process 0 makes the folders next): all refuse or none.
    (foreign,) = distributed.any_process(0, workdir.is_foreign())
    if foreign:
        raise ValueError(f"{workdir} is not empty and holds no digitseq run; pick a new or empty --workdir")
    main = distributed.is_main()
    with workdir.locked() if main else contextlib.nullcontext():  # the other processes share process 0's lock
        if main:
            workdir.remove_partials()
        continuing = resume and workdir.has_checkpoint() and workdir.holds_a_run()
        if resume and not workdir.has_checkpoint() and workdir.model.is_file():
            raise ValueError(
                f"{workdir} holds a model.h5 but no checkpoint to continue from; to train again from the start "
                "pass --no-resume (discards model.h5 and metrics.jsonl), or pick another --workdir"
            )
        if main and not continuing:  # a fresh start: nothing of an earlier run may linger
            workdir.clear_run()
        checkpoints = Checkpoints(workdir.checkpoints, writer=True)
        try:
            yield *_settle(config, workdir, continuing, checkpoints, initial), checkpoints
        finally:
            checkpoints.close()


def _settle(
    config: Recipe, workdir: Workdir, continuing: bool, checkpoints: Checkpoints, initial: Initial | None
) -> tuple[nets.Network, dict]:
    """The network (a continued run's recorded one, or that of the model `initial` makes) and its initial
    variables, the run's record checked against the one it continues; config.json written."""
    preset = nets.get_preset(config.preset)
    network = nets.build(preset, config.max_digits, config.ensemble)
    start_from = initial() if initial is not None and not continuing else None
    judged_start = start_from if start_from is not None and start_from.network.judged else None
    if judged_start is not None:
        start_from = judge.member(judged_start, "tuned")
    if continuing:
        saved = workdir.read_config()
        network = trained.recorded_network(workdir, saved, _legacy_variables(saved, checkpoints))
    elif start_from is not None:
        network = start_from.network
    variables = nets.init_variables(network, config.image_size, config.seed)
    if start_from is not None:  # its weights, in the structure and types a fresh start has
        given = {name: start_from.variables.get(name, {}) for name in variables}
        variables = jax.tree.map(lambda fresh, weights: np.asarray(weights, fresh.dtype), variables, given)
    record = dataclasses.asdict(config) | {
        "image_size": list(config.image_size), "distortions": list(config.distortions),
        "layers": nets.layers_to_json(network.layers), "devices": jax.device_count(),
        "processes": jax.process_count(),
    }  # fmt: skip
    if continuing:
        keys = RESUME_KEYS + (("epochs",) if config.schedule != "constant" else ())  # epochs shape the schedule
        changed = [key for key in keys if saved.get(key) != record.get(key)]
        if changed:
            was = ", ".join(f"{key}={saved.get(key)!r}" for key in changed)
            raise ValueError(
                f"{workdir} holds a run trained with {was}; to continue it pass the same values, "
                "or start over with --no-resume (discards it), or pick another --workdir"
            )
        if network.layers != preset.layers and initial is None:  # said once the run is sure to continue
            note(f"{workdir} continues with the network it recorded, not today's {preset.name} preset")
    if distributed.is_main():
        workdir.write_config(record)
        if judged_start is not None and not continuing:
            keras_h5.write(workdir.start_model, judged_start.network, config.image_size, judged_start.variables,
                           config.preset, layout=config.layout, label_smoothing=config.label_smoothing)  # fmt: skip
    distributed.barrier("workdir prepared")
    return network, variables


def recorded_choice(path: Path) -> dict | None:
    """What a rerun on `path` without --preset continues with: the preset, ensemble, layout, distortions and
    weight decay its run records (None: no run there, or one of a preset that is gone)."""
    workdir = Workdir(path)
    saved = workdir.read_config() if workdir.holds_a_run() else {}
    if saved.get("preset") not in RECIPES:
        return None
    return {key: saved[key] for key in ("preset", *RECORDED_BEFORE)}


def _legacy_variables(saved: dict, checkpoints: Checkpoints) -> dict | None:
    """A workdir recorded before networks were continues with today's preset only if its checkpoint fits it:
    the checkpoint's variables, for recorded_network to check (None for a workdir that records its network)."""
    if "layers" in saved:
        return None
    found = checkpoints.restore_good(note=note)
    return found[1] if found else None


def note(line: str) -> None:
    if distributed.is_main():
        print(f"{PROG}: note: {line}", file=sys.stderr, flush=True)


# --- the loop -------------------------------------------------------------------------------------


def train(run: Run, data: Data) -> int:
    """Trains to the end, the time budget or a signal; returns the process exit status."""
    config, per_epoch = run.config, run.config.steps_per_epoch
    step, total = int(run.state.step), config.total_steps
    if step >= total:
        return already_trained(run, step)
    batches = device_batches(data.train(step, (jax.process_index(), jax.process_count())))
    budget = _Budget(run.started, config.time_budget, finish_seconds=config.val_examples / 1000)
    estimate = _Estimate(step, total, run.main)
    epoch = None  # the epoch in progress, once this invocation has begun one
    with Interrupts() as interrupts:
        while True:
            if epoch is None or step % per_epoch == 0:  # an epoch begins (or resumes, mid-way)
                epoch = begin_epoch(run, step)
            run.state = run.step_fn(run.state, *next(batches))
            step += 1
            if step == estimate.first:  # the first step compiled: the epoch's rate counts from its end
                jax.block_until_ready(run.state.step)
                epoch.clock(step)
            estimate.after(step, run.state)
            epoch.bar.advance(step - epoch.number * per_epoch, run.state)
            save_due = time.monotonic() - run.saved_at > CHECKPOINT_MINUTES * 60
            signalled, late, save_due = distributed.any_process(
                step, interrupts.signal is not None, budget.late(), save_due
            )
            if signalled:
                return stop_on_signal(run, epoch, interrupts.signal or signal.SIGTERM)
            if step % per_epoch == 0 or step == total or late:
                with budget.finishing():
                    end_epoch(run, epoch, step, data)
                if late:
                    run.say(f"{PROG}: the time budget of {config.time_budget:g} min is spent: stopped at step "
                            f"{step} of {total}, everything saved; rerun the same command to go on")  # fmt: skip
                    return 0
                if step == total:
                    break
            elif (step % config.checkpoint_every == 0) if config.checkpoint_every else save_due:
                save(run)
        if interrupts.signal is not None:  # it came while the last epoch was being finished
            run.say(f"{PROG}: {signal.Signals(interrupts.signal).name} while finishing: the run is complete and "
                    f"saved at step {step}", stderr=True)  # fmt: skip
            return 128 + interrupts.signal
    run.say(f"{PROG}: done at step {step}; model: {run.workdir.model}")
    return 0


def device_batches(stacks: Iterator[dict]) -> Iterator[tuple[dict, jax.Array]]:
    """(stack, index) for each step: the step trains on batch `index` of the stack. Each stack goes to the
    devices whole and one ahead of the steps that read it: no step waits for, or pays, a transfer of its own."""
    replicated, _, stacked = shardings()

    def on_devices(stack: dict) -> dict:
        return {name: jax.make_array_from_process_local_data(stacked, a) for name, a in stack.items()}

    ahead = on_devices(next(stacks))
    indices = [np.int32(i) for i in range(ahead["labels"].shape[0])]
    indices = [jax.make_array_from_process_local_data(replicated, i) for i in indices]
    while True:
        stack, ahead = ahead, on_devices(next(stacks))
        for index in indices:
            yield stack, index


def begin_epoch(run: Run, step: int) -> _Epoch:
    per_epoch = run.config.steps_per_epoch
    epoch = _Epoch(step // per_epoch, step, per_epoch, run.main)
    run.say(f"Epoch {epoch.number + 1}/{run.config.epochs}")
    if step % per_epoch == 0:  # its figures start from zero, resumed or not
        zeros = jax.device_put(metrics.zeros(run.config.max_digits), shardings()[0])
        run.state = run.state.replace(sums=zeros)
    return epoch


def end_epoch(run: Run, epoch: _Epoch, step: int, data: Data) -> None:
    """Validates, logs, checkpoints and writes model.h5 (also at a stop before the epoch's end)."""
    epoch.bar.close()
    check_finite(run)  # waits for the last step
    steps_per_second = epoch.steps_per_second(step)
    train_figures = metrics.summarize(run.state.sums)
    val_figures = validate(run, data)
    seconds = time.perf_counter() - epoch.started
    if run.main:
        log_epoch(run, step, seconds, step - epoch.first_step, steps_per_second, train_figures, val_figures)
    save(run, val_figures)
    write_model(run)


def stop_on_signal(run: Run, epoch: _Epoch, signum: int) -> int:
    epoch.bar.close()
    save(run)
    name = signal.Signals(signum).name
    run.say(f"{PROG}: {name}: saved step {int(run.state.step)} in {run.workdir.checkpoints}; "
            "rerun the same command to continue", stderr=True)  # fmt: skip
    return 128 + signum


def already_trained(run: Run, step: int) -> int:
    # Bring model.h5 up to the checkpoint: a kill or a full disk between the two can leave it behind.
    if run.main and keras_h5.recorded_step(run.workdir.model) != step:
        write_model(run)
        run.say(f"{PROG}: wrote {run.workdir.model} of step {step} (it was missing or older)")
    run.say(f"{PROG}: {run.workdir} is already trained to step {step}; nothing to do")
    return 0


def validate(run: Run, data: Data) -> dict:
    devices = jax.device_count()
    batch_size = math.ceil(EVAL_BATCH / devices) * devices
    total = run.config.val_examples
    progress = tqdm(total=total, desc="validating", unit="seq", leave=False, disable=None if run.main else True)
    figures = metrics.evaluate(
        run.network, run.state.variables, data.validation(batch_size), batch_size, shardings()[1], progress.update
    )
    progress.close()
    return figures


# --- what a run keeps -------------------------------------------------------------------------------


def check_finite(run: Run) -> None:
    """Stops the run, before anything is saved, once the loss or any parameter is NaN or infinite."""
    loss = float(np.sum(jax.device_get(run.state.sums["loss"])))
    if not math.isfinite(loss):
        what = f"the loss became {loss}"
    elif not bool(jax.device_get(training.all_finite(run.state.variables))):
        what = "the parameters became NaN or infinite"
    else:
        return
    kept = run.checkpoints.latest_step()
    where = f"the last good checkpoint (step {kept}) is kept" if kept is not None else "no checkpoint was saved"
    raise TrainingStopped(
        f"{what} by step {int(run.state.step)}; training stopped and {where} in "
        f"{run.workdir.checkpoints} (try a smaller --learning-rate)"
    )


def _rerun(reason: str) -> str:
    when = "once there is room" if "no space left" in reason else "once that is put right"
    return f"{when}, rerun the same command to continue"


@contextlib.contextmanager
def writing(run: Run, path: Path) -> Iterator[None]:
    """A failed write of `path` (disk full, …) stops the run in one sentence, like a failed checkpoint."""
    try:
        yield
    except OSError as error:
        kept = run.checkpoints.latest_step()
        intact = f"the checkpoint of step {kept} is intact" if kept is not None else "no checkpoint exists yet"
        reason = storage_failure(error)
        raise TrainingStopped(f"writing {path} failed ({reason}); {intact}; {_rerun(reason)}") from None


def save(run: Run, val_figures: dict | None = None) -> None:
    run.saved_at = time.monotonic()
    check_finite(run)
    step = int(run.state.step)
    if step in run.checkpoints.all_steps():
        return
    best = {BEST_METRIC: val_figures["sequence_accuracy"]} if val_figures else None
    try:
        run.checkpoints.save(step, serialization.to_state_dict(run.state), best)
    except SaveError as error:
        raise TrainingStopped(f"{error}; {_rerun(str(error))}") from None


def write_model(run: Run) -> None:
    """model.h5 of the weights trained (a run with start.h5: its judged model with them)."""
    if run.main:
        network, variables, step = run.network, jax.device_get(run.state.variables), int(run.state.step)
        with writing(run, run.workdir.model):
            if run.workdir.start_model.is_file():
                start = trained.judged_start(run.workdir)
                network, variables = judge.with_tuned(start.network, start.variables, variables)
            keras_h5.write(
                run.workdir.model, network, run.config.image_size, variables, run.config.preset, step,
                layout=run.config.layout, label_smoothing=run.config.label_smoothing,
            )  # fmt: skip


def log_epoch(
    run: Run, step: int, seconds: float, steps: int, steps_per_second: float | None, train: dict, val: dict
) -> None:
    """metrics.jsonl's line, TensorBoard's scalars and the Keras-like line of an epoch's end."""
    rate = None if steps_per_second is None else round(steps_per_second, 2)
    epoch = round(step / run.config.steps_per_epoch, 4)
    record = {"epoch": epoch, "step": step, "seconds": round(seconds, 3), "steps_per_second": rate}
    record |= metrics.flat(train) | metrics.flat(val, "val_")
    with writing(run, run.workdir.metrics_file):
        run.workdir.append_metrics(record)
    run.tensorboard = run.tensorboard or tf.summary.create_file_writer(str(run.workdir.tensorboard))
    with run.tensorboard.as_default(step=step):
        for name, value in record.items():
            if name not in ("epoch", "step", "seconds") and value is not None:
                tf.summary.scalar(name, value)
    run.tensorboard.flush()
    per_step = seconds / max(steps, 1) * 1000
    print(f"{seconds:.0f}s {per_step:.0f}ms/step - {metrics.keras_line(train)} - {metrics.keras_line(val, 'val_')}",
          flush=True)  # fmt: skip


# --- the loop's helpers ------------------------------------------------------------------------------


class Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP (the terminal closed) set a flag the loop checks after each step (a
    second Ctrl-C aborts); the handlers before are back on leaving."""

    def __enter__(self) -> Interrupts:
        self.signal: int | None = None
        signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        self.previous = {s: signal.signal(s, self.handle) for s in signals}
        return self

    def handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *_) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class _Epoch:
    """The epoch in progress: its number, where this invocation began it, its progress bar."""

    def __init__(self, number: int, first_step: int, per_epoch: int, shown: bool):
        self.number, self.first_step = number, first_step
        self.started = time.perf_counter()
        self.bar = _Progress(per_epoch, first_step - number * per_epoch, shown)
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


class _Progress:
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
