"""Train-step rate: the jitted Flax step beside the same network in Keras/TF, in one run.

    python -m model.benchmark [--batch-size 128] [--steps 10] [--repeats 5]

The `seed` network is timed both ways on the same random batch (images uint8 for Flax, which
scales them inside its step; float32 in [0, 1] for Keras, which takes them so). The Keras model
is the very network Flax trains: written to a model.h5 and loaded by Keras, compiled with Adam
and five sparse categorical cross-entropies, timed with `train_on_batch` (Keras's default on a
CPU: no XLA). Flax and Keras alternate, `--repeats` times, each after warm-up; the figures are
medians. The `default` network is timed in Flax only. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import jax
import numpy as np
import optax
from tqdm import tqdm

from model import keras_h5, training
from model import networks as nets

PROG = "python -m model.benchmark"


def _flax_timer(preset: nets.Preset, batch: dict, positions: int):
    network = nets.build(preset, positions)
    image_size = batch["image"].shape[1:3]
    optimizer = optax.adam(1e-3)
    state = training.create_state(nets.init_variables(network, image_size, 0), optimizer, positions)
    step = training.jit_train_step(network, optimizer, seed=0)
    batch = jax.device_put(batch)
    state = step(state, batch)  # compile
    jax.block_until_ready(state)

    def run(steps: int) -> float:
        nonlocal state
        started = time.perf_counter()
        for _ in range(steps):
            state = step(state, batch)
        jax.block_until_ready(state)
        return time.perf_counter() - started

    return network, state, run


def _keras_timer(network: nets.Network, variables: dict, preset: str, batch: dict):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.h5")
        keras_h5.write(path, network, batch["image"].shape[1:3], variables, preset)
        model = keras.models.load_model(path, compile=False)
    positions = batch["labels"].shape[1]
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss=["sparse_categorical_crossentropy"] * positions)
    images = batch["image"].astype(np.float32) / 255.0
    labels = [batch["labels"][:, k] for k in range(positions)]
    model.train_on_batch(images, labels)  # builds the graph

    def run(steps: int) -> float:
        started = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(images, labels)
        return time.perf_counter() - started

    return run


def random_batch(batch_size: int, image_size: tuple[int, int], positions: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (batch_size, *image_size, 1), dtype=np.uint8),
        "labels": rng.integers(0, nets.NUM_CLASSES, (batch_size, positions)).astype(np.int32),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Time the jitted Flax train step of the seed network against the same network in "
        "Keras/TF (and the default network, Flax only). Last line of output: one JSON object.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--batch-size", type=int, default=128, help="examples per step")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each, alternating")
    parser.add_argument("--max-digits", type=int, default=5, help="positions (heads)")
    args = parser.parse_args(argv)
    for name in ("batch_size", "steps", "repeats", "max_digits"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    positions = args.max_digits

    seed_shape = nets.SEED.checked_image_size(positions)
    seed_batch = random_batch(args.batch_size, seed_shape, positions)
    network, state, flax_run = _flax_timer(nets.SEED, seed_batch, positions)
    keras_run = _keras_timer(network, jax.device_get(state.variables), nets.SEED.name, seed_batch)
    default_shape = nets.DEFAULT.checked_image_size(positions)
    _, _, default_run = _flax_timer(nets.DEFAULT, random_batch(args.batch_size, default_shape, positions), positions)

    examples = args.batch_size * args.steps
    runs: dict[str, list[float]] = {"flax": [], "keras": [], "default_flax": []}
    with tqdm(total=args.repeats * 3, desc="timing", unit="run") as bar:
        for _ in range(args.repeats):
            for name, run in (("flax", flax_run), ("keras", keras_run), ("default_flax", default_run)):
                runs[name].append(examples / run(args.steps))
                bar.set_postfix({k: f"{v[-1]:.0f}/s" for k, v in runs.items() if v})
                bar.update()
    flax_rate, keras_rate = statistics.median(runs["flax"]), statistics.median(runs["keras"])
    ratios = [f / k for f, k in zip(runs["flax"], runs["keras"], strict=True)]
    default_rate = statistics.median(runs["default_flax"])
    seed_size, default_size = "x".join(map(str, seed_shape)), "x".join(map(str, default_shape))
    print(
        f"seed network, batch {args.batch_size}, {seed_size}: Flax {flax_rate:.1f} ex/s, Keras/TF "
        f"{keras_rate:.1f} ex/s, ratio {flax_rate / keras_rate:.2f} (runs {min(ratios):.2f}–{max(ratios):.2f})"
    )
    print(f"default network, batch {args.batch_size}, {default_size}: Flax {default_rate:.1f} ex/s")
    result = {
        "preset": "seed",
        "batch_size": args.batch_size,
        "image_size": list(seed_shape),
        "flax_ex_per_s": round(flax_rate, 1),
        "keras_ex_per_s": round(keras_rate, 1),
        "ratio": round(flax_rate / keras_rate, 3),
        "ratio_per_run": [round(r, 3) for r in ratios],
        "default": {
            "preset": "default",
            "batch_size": args.batch_size,
            "image_size": list(default_shape),
            "flax_ex_per_s": round(default_rate, 1),
        },
        "runs": {name: [round(r, 1) for r in rates] for name, rates in runs.items()},
        "steps_per_run": args.steps,
        "devices": jax.device_count(),
        "backend": jax.default_backend(),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
