"""Trains a digit-sequence reader: `python train.py [--preset default|seed|accurate] [flags]`.

Flags → a recipe (model/recipes.py, the flags given put in place of its values) → the training loop
(model/loop.py), fed with sequences from `pipeline`. The workdir keeps config.json, metrics.jsonl,
checkpoints/ (orbax), tensorboard/ and model.h5; rerunning the same command continues the run.
"""

from __future__ import annotations

import startup  # (first: a quiet Ctrl-C while the libraries load; TensorFlow configured)

# isort: split
import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from model import distributed, judge, loop, trained
from model import networks as nets
from model.recipes import ACCELERATOR_ENSEMBLE, CHECKPOINT_MINUTES, FINE_TUNING, RECIPES, STREAMING_EPOCH, Recipe
from model.workdir import Workdir
from pipeline import flags, folders
from pipeline.mnist import load_pool
from pipeline.sequences import (
    Numbers,
    SequenceConfig,
    eval_batches,
    fixed_set,
    numpy_batches,
    numpy_stacks,
    train_batches,
)

PROG = "train.py"


def sequences(config: Recipe, data_dir: str | None, mnist_dir: str | None, own: OwnNumbers | None = None) -> loop.Data:
    """The loop's data: training stacks as the recipe draws them, a user's numbers among them; validation
    never augmented nor distorted (it chooses checkpoints for MNIST's own hand — or the user's numbers held
    out). The pools load at the first call."""
    train_sequences = SequenceConfig(config.max_digits, config.image_size, config.augment, config.layout,
                                     config.distortions)  # fmt: skip
    val_sequences = dataclasses.replace(train_sequences, augment=False, distortions=())

    def train(start_step: int, shard: tuple[int, int]) -> Iterator[dict]:
        pool = load_pool("train", data_dir, mnist_dir)
        return numpy_stacks(train_batches(
            pool, train_sequences, batch_size=config.batch_size, seed=config.seed,
            num_examples=config.train_examples, start_step=start_step, shard=shard,
            numbers=own.numbers if own else None,
        ))  # fmt: skip

    def validation(batch_size: int) -> Iterator[dict]:
        if own:
            return folders.batches(*own.validation, config.image_size, batch_size)
        pool = load_pool(config.validate_on, data_dir, mnist_dir)
        return numpy_batches(eval_batches(
            pool, val_sequences, num_examples=config.val_examples, batch_size=batch_size, seed=config.seed,
        ))  # fmt: skip

    return loop.Data(train, validation)


@dataclasses.dataclass(frozen=True)
class OwnNumbers:
    numbers: Numbers  # trained on beside MNIST's sequences
    validation: tuple[np.ndarray, np.ndarray]  # canvases and labels of the numbers that choose the checkpoint


def own_numbers(args: argparse.Namespace, config: Recipe) -> tuple[Recipe, OwnNumbers | None]:
    """The --data folders' numbers to train on and the ones that choose the checkpoint (--val-data's, else a
    held-out share), every folder checked first; the recipe recording them."""
    if not args.data:
        return config, None
    layout = "cells" if config.layout == "cells" else "free"  # framed as a model of this layout reads
    trained_on = [folders.read_folder(path, config.max_digits, layout) for path in args.data]
    chosen_by = [folders.read_folder(path, config.max_digits, layout) for path in args.val_data or ()]
    canvases, labels = folders.joined(trained_on, config.max_digits)
    if chosen_by:
        validation = folders.joined(chosen_by, config.max_digits)
    else:
        kept, held = folders.split(trained_on)
        validation = canvases[held], labels[held]
        canvases, labels = canvases[kept], labels[kept]
    share = folders.SHARE if args.data_share is None else args.data_share
    numbers = folders.numbers(canvases, labels, share, config.distortions, config.image_size, config.seed)
    config = dataclasses.replace(
        config, data=tuple(map(str, args.data)), data_share=share, val_data=tuple(map(str, args.val_data or ())),
        data_digest=folders.digest(trained_on, chosen_by), val_examples=len(validation[1]),
    )  # fmt: skip
    return config, OwnNumbers(numbers, validation)


def starting_point(
    initial: trained.Trained, config: Recipe, own: OwnNumbers | None, data_dir: str | None, mnist_dir: str | None
) -> trained.Trained:
    """What fine-tuning `initial` starts from. On a user's numbers: a judged model (model/judge.py), its start
    `initial` (of a judged model: its start) and a judge that tells the user's numbers, as training draws them,
    from MNIST's sequences by the start's features; its fine-tuned network is trained. Otherwise the network
    to train (of a judged model: its fine-tuned one). An ensemble gets no judge."""
    start, tuned = judge.member(initial, "start"), judge.member(initial, "tuned")
    if own is None or start.network.members > 1:
        return tuned
    drawn = own.numbers.images.reshape(-1, *own.numbers.images.shape[2:])
    hand = drawn[np.random.default_rng(config.seed).permutation(len(drawn))[: judge.EXAMPLES]]
    sequences = SequenceConfig(config.max_digits, config.image_size, layout=config.layout,
                               distortions=config.distortions)  # fmt: skip
    others, _ = fixed_set(load_pool("train", data_dir, mnist_dir), sequences, judge.EXAMPLES, seed=config.seed)
    weights = judge.fit(start, hand[..., None], others[..., None])
    network, variables = judge.judged(start.network, start.variables, tuned.variables, weights)
    return dataclasses.replace(initial, network=network, variables=variables)


def default_workdir(args: argparse.Namespace, config: Recipe) -> Path:
    """runs/<preset>; a run on --data folders: runs/<the first folder's name>."""
    return Path("runs") / (Path(args.data[0]).resolve().name if args.data else config.preset)


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
        "--weight-decay", type=float, metavar="WD",
        help=f"decoupled weight decay (AdamW) on the kernels: each step shrinks them by the rate × WD, 0 for none "
        f"{recipe('weight_decay')}",
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
    own = parser.add_argument_group(
        "your own numbers (docs/own-numbers.md)",
        "A labelled folder holds image files and a labels.csv with the columns file,digits. Its numbers are "
        "framed as predict.py frames a file, drawn with the recipe's distortions, and take a share of every "
        "batch; MNIST's sequences the rest, so that what was learned is kept.",
    )
    own.add_argument(
        "--data", type=Path, action="append", metavar="DIR",
        help="train on this labelled folder's numbers beside MNIST's sequences (repeatable); the workdir "
        "defaults to runs/<the folder's name>",
    )  # fmt: skip
    own.add_argument(
        "--data-share", type=flags.fraction, metavar="FRACTION",
        help=f"of every batch's sequences, the share drawn from the --data folders (default: {folders.SHARE:g})",
    )  # fmt: skip
    own.add_argument(
        "--val-data", type=Path, action="append", metavar="DIR",
        help="labelled folder whose numbers choose the checkpoint (repeatable; default: "
        f"{folders.HELD_OUT * 100:g} %% of the --data numbers, held out of training)",
    )  # fmt: skip
    tuning = (f"{FINE_TUNING['epochs']} epochs of a fixed {FINE_TUNING['train_examples']:,} MNIST sequences (and the "
              f"folders' share), learning rate {FINE_TUNING['learning_rate']:g} with a {FINE_TUNING['schedule']} "
              "schedule")  # fmt: skip
    own.add_argument(
        "--init-from", type=Path, metavar="MODEL",
        help="start from this model's network and weights (a model.h5, or a workdir's latest checkpoint) with "
        f"the recipe of its preset made for fine-tuning: {tuning} (flags given still win). With --data, the "
        "model written keeps the start beside the fine-tuned network, and a judge of the folder's hand: each "
        "image is read by the one whose hand it is in, so numbers like MNIST's read as before",
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
    recorded = loop.recorded_choice(args.workdir) if args.workdir is not None and args.resume else None
    if recorded:
        return recorded["preset"], recorded, f"the preset {args.workdir} records"
    if backend != "cpu":
        why = f"on {backend}: the accurate preset (--preset default for the CPU recipe)"
        return "accurate", {"ensemble": ACCELERATOR_ENSEMBLE}, why
    return "default", {}, ""


OWN_FLAGS = ("data", "data_share", "val_data", "init_from")  # recorded by own_numbers and fine_tuned, not as given


def config_from_args(
    args: argparse.Namespace, backend: str = "cpu", initial: trained.Trained | None = None
) -> tuple[Recipe, str]:
    """The preset's recipe with the flags that were given put in place of its values, and a line saying
    what was chosen and why when --preset was left out ("" for the CPU default). Starting from `initial`
    (--init-from): its preset's recipe made for fine-tuning, with its network's shape."""
    fields = {field.name for field in dataclasses.fields(Recipe)} - set(OWN_FLAGS)
    given = {name: value for name, value in vars(args).items() if name in fields and value is not None}
    if args.streaming:
        given["train_examples"] = None
    if args.data_share is not None and not args.data:
        raise ValueError("--data-share is the share of the --data folders' numbers; give --data DIR too")
    if args.val_data and not args.data:
        raise ValueError("--val-data chooses the checkpoint of a run on --data folders; give --data DIR too")
    reason = ""
    if initial is not None:
        given = fine_tuned(initial, given)
    elif args.preset is None:
        preset, extra, why = chosen_preset(args, backend)
        given = {"preset": preset, **extra, **given}
        if why:
            members = given.get("ensemble", RECIPES[preset].ensemble)
            what = f"an ensemble of {members}" if members > 1 else "one network"
            reason = f"{PROG}: training {preset}, {what}: {why}"
    config = dataclasses.replace(RECIPES[given["preset"]], **given)
    # The image size, from here to model.h5: the one asked for, else the preset's (checked against it).
    image_size = nets.get_preset(config.preset).checked_image_size(config.max_digits, config.image_size)
    config = dataclasses.replace(config, image_size=image_size)
    if not (config.learning_rate > 0 and math.isfinite(config.learning_rate)):
        raise ValueError(f"--learning-rate must be positive and finite, not {config.learning_rate}")
    if not 0 <= config.label_smoothing < 1:
        raise ValueError(f"--label-smoothing must be in [0, 1), not {config.label_smoothing}")
    if not (config.weight_decay >= 0 and math.isfinite(config.weight_decay)):
        raise ValueError(f"--weight-decay must be 0 or more and finite, not {config.weight_decay}")
    if initial is not None:
        config = dataclasses.replace(config, init_from=initial.description, init_digest=initial.digest())
    if config.train_examples is not None and config.train_examples < config.batch_size:
        raise ValueError(f"--train-examples {config.train_examples} cannot fill one batch of {config.batch_size}")
    return config, reason


def fine_tuned(initial: trained.Trained, given: dict) -> dict:
    """The recipe values of fine-tuning `initial` (FINE_TUNING, the shape of its network), the flags given on
    top; a flag that would change its network refused."""
    shaped = [f"--{name.replace('_', '-')}" for name in ("preset", "ensemble", "max_digits", "image_size")
              if name in given]  # fmt: skip
    if shaped:
        raise ValueError(f"{shaped[0]} cannot be given with --init-from: the network is the model's")
    if initial.preset not in RECIPES:
        raise ValueError(f"--init-from {initial.description}: its preset {initial.preset!r} has no recipe here")
    network = judge.member(initial, "tuned").network
    shape = dict(preset=initial.preset, max_digits=network.positions, image_size=tuple(initial.image_size),
                 ensemble=network.members, layout=initial.layout)  # fmt: skip
    return {**FINE_TUNING, **shape, **given}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.process_id is not None and args.num_processes is not None and args.process_id >= args.num_processes:
        raise ValueError(f"--process-id {args.process_id} must be below --num-processes {args.num_processes}")
    try:
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.distributed)
        initial = trained.load(args.init_from) if args.init_from else None
        config, reason = config_from_args(args, jax.default_backend(), initial)  # the backend is known once JAX started
        if reason and distributed.is_main():
            print(reason, flush=True)
        config, own = own_numbers(args, config)  # every folder checked before anything is written
        workdir = args.workdir or default_workdir(args, config)
        if initial is not None and initial.workdir and initial.workdir.path.resolve() == workdir.resolve():
            raise ValueError(f"--init-from {args.init_from} is in the workdir this run would train in; pick another "
                             "--workdir")  # fmt: skip
        startup.report_crashes_to(Workdir(workdir).crash_file)
        data = sequences(config, args.data_dir, args.mnist_dir, own)
        begin = None if initial is None else lambda: starting_point(initial, config, own, args.data_dir, args.mnist_dir)
        return loop.train_and_evaluate(config, workdir, data, args.resume, begin)
    except (loop.TrainingStopped, distributed.DistributedError) as error:
        print(f"{PROG}: {error}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    flags.exit_with(main, PROG)
