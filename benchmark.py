"""The training loop's own cost: train.py's steps/s beside its bare jitted step, in one process.

    python benchmark.py [--preset default] [--max-digits 1] [--batch-size 2] [--steps 3000] [--repeats 5]

Each repeat builds a fresh run of train.py (a temporary workdir) and times, one after the other:
- the bare step: the run's own jitted step, `--steps` times on one batch already on the device;
- the loop: `train.py`'s loop for two epochs of `--steps` steps each (tf.data, the batches put on
  the devices ahead, the step, progress, signals, periodic checkpoints), whose steps/s of the
  second epoch is read from metrics.jsonl (validation and compilation are not in it).
The defaults make the smallest step a preset has (~2 ms on 2 CPU cores), where the loop's cost
shows most. Overhead = 1 - loop / bare of each repeat (the two timed side by side); the median is
reported. Last line of output: one JSON object.
"""

from __future__ import annotations

import startup  # noqa: F401  (first: a quiet Ctrl-C while the libraries load; TensorFlow configured)

# isort: split
import contextlib
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from tqdm import tqdm

import train
from model import loop
from model import networks as nets
from pipeline import flags

PROG = "benchmark.py"


def bare_steps_per_second(run: loop.Run, data: loop.Data, steps: int) -> float:
    batches = loop.device_batches(data.train(0, (0, 1)))
    stack, index = next(batches)
    batches.close()  # tf.data's threads stop: nothing but the step runs
    state = jax.tree.map(jnp.copy, run.state)
    for _ in range(10):  # compiles, warms up
        state = run.step_fn(state, stack, index)
    jax.block_until_ready(state)
    started = time.perf_counter()
    for _ in range(steps):
        state = run.step_fn(state, stack, index)
    jax.block_until_ready(state)
    return steps / (time.perf_counter() - started)


def loop_steps_per_second(run: loop.Run, data: loop.Data) -> float:
    with contextlib.redirect_stdout(io.StringIO()):
        status = loop.train(run, data)
    if status:
        raise SystemExit(f"benchmark.py: the training loop stopped with status {status}")
    return run.workdir.read_metrics()[-1]["steps_per_second"]


def main(argv: list[str] | None = None) -> None:
    parser = flags.ArgumentParser(
        prog=PROG,
        description="Time train.py's whole loop against its bare jitted step on the same network and batch. "
        "Last line of output: one JSON object.",
    )
    parser.add_argument("--preset", choices=list(nets.PRESETS), default="default", help="network (default: default)")
    parser.add_argument("--max-digits", type=flags.positive_int, default=1, help="positions (default: 1)")
    parser.add_argument("--batch-size", type=flags.positive_int, default=2, help="global batch (default: 2)")
    parser.add_argument(
        "--steps", type=flags.positive_int, default=3000,
        help="steps timed bare, and in each of the loop's 2 epochs (default: 3000)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=flags.positive_int, default=5, help="repeats (default: 5)")
    flags.add_data_flags(parser)
    args = parser.parse_args(argv)
    runs: dict[str, list[float]] = {"bare": [], "loop": []}
    for _ in tqdm(range(args.repeats), desc="timing", unit="repeat"):
        with tempfile.TemporaryDirectory() as workdir:
            argv = [
                "--preset", args.preset, "--max-digits", str(args.max_digits), "--batch-size", str(args.batch_size),
                "--train-examples", str(args.steps * args.batch_size), "--epochs", "2", "--val-examples", "100",
                "--workdir", workdir,
            ]  # fmt: skip
            config, _ = train.config_from_args(train.parse_args(argv))
            data = train.sequences(config, args.data_dir, args.mnist_dir)
            with loop.start(config, Path(workdir), resume=False) as run:
                runs["bare"].append(bare_steps_per_second(run, data, args.steps))
                runs["loop"].append(loop_steps_per_second(run, data))
    bare, looped = statistics.median(runs["bare"]), statistics.median(runs["loop"])
    overheads = [1 - loop_rate / bare_rate for bare_rate, loop_rate in zip(runs["bare"], runs["loop"], strict=True)]
    overhead = statistics.median(overheads)
    print(
        f"{args.preset} network, {args.max_digits} digit(s), batch {args.batch_size}: bare step {bare:.1f} steps/s "
        f"({1000 / bare:.2f} ms), train.py's loop {looped:.1f} steps/s: overhead {100 * overhead:.1f} % "
        f"(repeats {100 * min(overheads):.1f} to {100 * max(overheads):.1f} %)",
        file=sys.stderr,
    )
    result = {
        "preset": args.preset, "max_digits": args.max_digits, "batch_size": args.batch_size, "steps": args.steps,
        "bare_steps_per_s": round(bare, 1), "loop_steps_per_s": round(looped, 1),
        "overhead": round(overhead, 4), "overhead_per_repeat": [round(o, 4) for o in overheads],
        "runs": {name: [round(r, 1) for r in rates] for name, rates in runs.items()},
        "backend": jax.default_backend(), "devices": jax.device_count(),
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    flags.exit_with(main, PROG)
