"""Command-line faces run for real: export, the input-throughput, step-rate and loop benchmarks."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import command, run

from pipeline.distort import DISTORTIONS
from pipeline.sequences import SequenceConfig, eval_batches, numpy_batches


@pytest.mark.parametrize(
    "suffix,size,layout,distortions",
    [(".npz", None, "cells", ()), (".h5", "64x64", "cells", ()), (".npz", None, "free", ()),
     (".npz", None, "mixed", DISTORTIONS)],
)  # fmt: skip
def test_export_writes_the_eval_set(tmp_path, pools, suffix, size, layout, distortions):
    out = tmp_path / f"test{suffix}"
    extra = ["--image-size", size] if size else []
    extra += ["--distortions", ",".join(distortions)] if distortions else []
    flags = ["--examples", "300", "--seed", "5", "--layout", layout, "--out", str(out), *extra]
    result = run("-m", "pipeline.export", "--split", "test", *flags)
    assert result.returncode == 0, result.stderr
    assert ("(distorted: " in result.stdout) == bool(distortions)
    if suffix == ".h5":
        with h5py.File(out) as f:
            images, labels = f["images"][:], f["labels"][:]
            assert f.attrs["layout"] == layout and f.attrs["distortions"] == "none"
    else:
        with np.load(out) as f:
            images, labels = f["images"], f["labels"]
    config = SequenceConfig(image_size=(64, 64) if size else None, layout=layout, distortions=distortions)
    expected = list(numpy_batches(eval_batches(pools["test"], config, num_examples=300, batch_size=300, seed=5)))[0]
    assert images.dtype == np.uint8 and labels.dtype == np.int32
    assert images.shape == (300, *config.image_size) and labels.shape == (300, 5)
    assert np.array_equal(images, expected["image"][..., 0]) and np.array_equal(labels, expected["labels"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--max-digits", "0"], "--max-digits: must be at least 1"),
        (["--image-size", "0x64"], "image size must be positive"),
        (["--examples", "-5"], "--examples: must be at least 1"),
        (["--split", "everything"], "invalid choice"),
    ],
)
def test_export_refuses_bad_flags(tmp_path, flags, message):
    result = run("-m", "pipeline.export", "--out", str(tmp_path / "x.npz"), *flags)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x.npz").exists()


def test_export_refuses_other_formats(tmp_path):
    result = run("-m", "pipeline.export", "--out", str(tmp_path / "x.csv"))
    assert result.returncode == 2 and "must end in .npz or .h5" in result.stderr
    result = run("-m", "pipeline.export", "--preview", str(tmp_path / "x.jpg"))
    assert result.returncode == 2 and "--preview must name a file ending in .png" in result.stderr
    result = run("-m", "pipeline.export")
    assert result.returncode == 2 and "say where to write" in result.stderr


def test_export_preview_draws_the_sequences(tmp_path, mnist_dir):
    from PIL import Image

    # As a user types it, in a process of its own (the other tests of the command call it in this one).
    result = command("-m", "pipeline.export", "--split", "train", "--layout", "mixed", "--examples", "8",
                     "--preview", str(tmp_path / "grid.png"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    with Image.open(tmp_path / "grid.png") as image:
        pixels = np.asarray(image.convert("L"))
    assert image.format == "PNG" and 300 < image.width < 2000 and 100 < image.height < 2000
    assert (pixels == 0).mean() > 0.3 and pixels.std() > 40  # black sequences, white ink and paper
    assert not list(tmp_path.glob("*.npz"))


def test_the_libraries_load_without_keras_and_keras_still_loads():
    # TensorFlow's import would load Keras's optimizers (a second of every command's start, docs/tests.md):
    # pipeline has that import skipped, and leaves Keras importable for whatever uses it.
    script = (
        "import sys, pipeline; print('keras' in sys.modules, 'sklearn' in sys.modules); "
        "import keras.src.optimizers, tensorflow as tf; print(tf.keras.optimizers.Adam.__name__)"
    )
    result = command("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False", "Adam"]


def test_benchmark_prints_json_last(mnist_dir):
    result = run(
        "pipeline.benchmark",
        "--repeats",
        "2",
        "--batches",
        "4",
        "--warmup-batches",
        "2",
        "--baseline-examples",
        "100",
        "--batch-size",
        "64",
        "--threads",
        "1",
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["tfdata_seq_per_s"] > 0 and figures["baseline_loop_seq_per_s"] > 0
    assert figures["free_seq_per_s"] > 0 and figures["mixed_seq_per_s"] > 0 and len(figures["tfdata_runs"]["free"]) == 2
    assert figures["free_distorted_seq_per_s"] > 0 and figures["mixed_distorted_seq_per_s"] > 0
    assert figures["distortions"] == list(DISTORTIONS) and figures["versions_s"] > 0
    assert figures["batch_size"] == 64 and figures["image_size"] == [28, 140] and figures["threads"] == 1
    assert figures["speedup"] == pytest.approx(
        figures["tfdata_seq_per_s"] / figures["baseline_loop_seq_per_s"], rel=0.01
    )


def test_step_rate_benchmark_prints_json_last():
    result = run("-m", "model.benchmark", "--batch-size", "8", "--steps", "2", "--repeats", "2")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["preset"] == "seed" and figures["batch_size"] == 8 and figures["image_size"] == [64, 64]
    assert figures["flax_ex_per_s"] > 0 and figures["keras_ex_per_s"] > 0
    assert figures["ratio"] == pytest.approx(figures["flax_ex_per_s"] / figures["keras_ex_per_s"], rel=0.01)
    assert figures["default"]["preset"] == "default" and figures["default"]["flax_ex_per_s"] > 0
    assert len(figures["runs"]["keras"]) == 2


def test_loop_benchmark_prints_json_last(mnist_dir):
    result = run("benchmark.py", "--steps", "30", "--repeats", "1", "--batch-size", "4")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["preset"] == "default" and figures["batch_size"] == 4 and figures["steps"] == 30
    assert figures["bare_steps_per_s"] > 0 and figures["loop_steps_per_s"] > 0 and len(figures["runs"]["loop"]) == 1
    assert figures["overhead"] == pytest.approx(1 - figures["loop_steps_per_s"] / figures["bare_steps_per_s"], abs=2e-3)
