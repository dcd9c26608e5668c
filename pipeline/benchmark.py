"""Input throughput: sequences/s the tf.data pipeline delivers to Python as NumPy arrays.

    python -m pipeline.benchmark [--distortions all] [--image-size 64x64] [--augment] [--threads N]

Measures what a training loop consumes (uint8 batches as NumPy, after warm-up, several timed
repeats, median) for each layout — cells, free and mixed, and the free and mixed layouts drawn with
the distortions named (all by default; `pipeline.distort`), their repeats taken in turn so that the
machine's drift falls on all alike — and, in the same run, the 2017 notebook's way: a Python loop
that stitches one example at a time. It also times making the distorted versions of the training
pool's digits, which a process does once. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import distort, flags
from pipeline.mnist import DigitPool, load_pool
from pipeline.sequences import BLANK, LAYOUTS, TILE, SequenceConfig, numpy_batches, train_batches


def notebook_loop(pool: DigitPool, config: SequenceConfig, count: int, rng: np.random.Generator) -> np.ndarray:
    """The notebook's data generation, one example at a time (the baseline, kept faithful on purpose)."""
    images, labels = [], []
    blank = np.zeros((TILE, TILE), np.uint8)
    for _ in range(count):
        length = int(rng.integers(1, config.max_digits + 1))
        picks = rng.integers(0, len(pool), size=length)
        tiles = [pool.images[i] for i in picks] + [blank] * (config.max_digits - length)
        image = np.hstack(tiles)
        if config.resized:
            height, width = config.image_size
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        images.append(image)
        labels.append([int(pool.labels[i]) for i in picks] + [BLANK] * (config.max_digits - length))
    return np.stack(images)


def time_tfdata(pool: DigitPool, configs: dict[str, SequenceConfig], args: argparse.Namespace) -> dict[str, list]:
    """Sequences/s of each config's stream, timed in turn: repeat 1 of each, then repeat 2 of each, …"""
    streams = {}
    for name, config in configs.items():
        streams[name] = numpy_batches(
            train_batches(
                pool, config, batch_size=args.batch_size, seed=0, num_examples=args.train_examples, threads=args.threads
            )
        )
        for _ in tqdm(range(args.warmup_batches), desc=f"tf.data warm-up, {name}", leave=False):
            next(streams[name])
    rates = {name: [] for name in configs}
    for _ in tqdm(range(args.repeats), desc="tf.data timed repeats", leave=False):
        for name, batches in streams.items():
            start = time.perf_counter()
            for _ in range(args.batches):
                batch = next(batches)
            rates[name].append(args.batches * args.batch_size / (time.perf_counter() - start))
            assert batch["image"].dtype == np.uint8
    return rates


def time_baseline(pool: DigitPool, config: SequenceConfig, args: argparse.Namespace) -> list[float]:
    rng = np.random.default_rng(0)
    rates = []
    for _ in tqdm(range(args.repeats), desc="notebook loop repeats", leave=False):
        start = time.perf_counter()
        notebook_loop(pool, config, args.baseline_examples, rng)
        rates.append(args.baseline_examples / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = flags.ArgumentParser(
        prog="python -m pipeline.benchmark",
        description="Sequences/s from the tf.data pipeline (as NumPy batches), for each layout, beside the "
        "notebook's one-example-at-a-time loop, measured in the same run. Last line: JSON.",
    )
    parser.add_argument("--batch-size", type=flags.positive_int, default=256, help="sequences per batch (default: 256)")
    parser.add_argument(
        "--augment", action="store_true",
        help="time the pipeline with augmentation (cells: per-digit shifts; free: the frame jittered)",
    )  # fmt: skip
    parser.add_argument(
        "--threads",
        type=flags.positive_int,
        default=None,
        help="size of tf.data's private thread pool (default: TensorFlow's choice, one per core)",
    )
    parser.add_argument(
        "--train-examples",
        type=flags.positive_int,
        default=None,
        help="time a fixed set of this many sequences (default: streaming, fresh sequences every step)",
    )
    parser.add_argument(
        "--repeats", type=flags.positive_int, default=5, help="timed repeats; the median is reported (default: 5)"
    )
    parser.add_argument(
        "--batches", type=flags.positive_int, default=400, help="batches per timed repeat (default: 400)"
    )
    parser.add_argument(
        "--warmup-batches", type=flags.positive_int, default=100, help="batches before timing (default: 100)"
    )
    parser.add_argument(
        "--baseline-examples",
        type=flags.positive_int,
        default=5000,
        help="examples per notebook-loop repeat (default: 5000)",
    )
    flags.add_sequence_flags(parser, with_layout=False, distortions_default="(default: all)")
    flags.add_data_flags(parser)
    parser.set_defaults(distortions=distort.DISTORTIONS)
    args = parser.parse_args(argv)
    config = dataclasses.replace(flags.sequence_config(args, augment=args.augment), distortions=())
    pool = load_pool("train", args.data_dir, args.mnist_dir)

    configs = {layout: dataclasses.replace(config, layout=layout) for layout in LAYOUTS}
    versions_s = None
    if args.distortions:
        # Timed as made; the streams below share the versions a process has (kept beside the pools: read back).
        started = time.perf_counter()
        distort.Distorter(args.distortions).variants(pool.images)
        versions_s = time.perf_counter() - started
        for layout in ("free", "mixed"):
            configs[f"{layout}+distorted"] = dataclasses.replace(config, layout=layout, distortions=args.distortions)
    tfdata = time_tfdata(pool, configs, args)
    baseline = time_baseline(pool, config, args)
    rates = {layout: statistics.median(runs) for layout, runs in tfdata.items()}
    tfdata_rate, baseline_rate = rates["cells"], statistics.median(baseline)
    result = {
        "tfdata_seq_per_s": round(tfdata_rate),  # the cell layout's, which the notebook loop builds too
        "free_seq_per_s": round(rates["free"]),
        "mixed_seq_per_s": round(rates["mixed"]),
        "free_distorted_seq_per_s": round(rates["free+distorted"]) if args.distortions else None,
        "mixed_distorted_seq_per_s": round(rates["mixed+distorted"]) if args.distortions else None,
        "distortions": list(args.distortions),
        "versions_s": None if versions_s is None else round(versions_s, 2),
        "baseline_loop_seq_per_s": round(baseline_rate),
        "speedup": round(tfdata_rate / baseline_rate, 1),
        "batch_size": args.batch_size,
        "image_size": list(config.image_size),
        "threads": args.threads or os.cpu_count(),
        "augment": args.augment,
        "mode": "streaming" if args.train_examples is None else f"fixed set of {args.train_examples}",
        "max_digits": args.max_digits,
        "repeats": args.repeats,
        "tfdata_runs": {layout: [round(r) for r in runs] for layout, runs in tfdata.items()},
        "baseline_runs": [round(r) for r in baseline],
    }
    shape = "x".join(map(str, config.image_size))
    distorted = ""
    if args.distortions:
        distorted = (
            f"; distorted ({', '.join(args.distortions)}): {rates['free+distorted']:,.0f} free, "
            f"{rates['mixed+distorted']:,.0f} mixed (the pool's versions made once, in {versions_s:.1f} s)"
        )
    print(
        f"{shape}{' augmented' if args.augment else ''}, batch {args.batch_size}, {result['threads']} threads: "
        f"tf.data {tfdata_rate:,.0f} seq/s in cells, {rates['free']:,.0f} free, {rates['mixed']:,.0f} mixed"
        f"{distorted}; notebook loop (cells) {baseline_rate:,.0f} seq/s, {result['speedup']}x"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    flags.exit_with(main, "pipeline.benchmark")
