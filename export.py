"""Exports a trained reader for other runtimes: `python export.py MODEL --format FORMAT [--out PATH]`.

    python export.py runs/default --format onnx              # runs/default/model.onnx
    python export.py runs/default/model.h5 --format tflite-int8 --out phone/digits.tflite
    python export.py runs/default --benchmark                # every format timed beside Flax (JSON last line)

MODEL is a model.h5 written by train.py, or a workdir (its model.h5); an ensemble exports as one
artifact, its members' mean probabilities. Every artifact takes uint8 images `image` [N, H, W, 1]
(0-255; the scaling to [0, 1] is inside, as in the train step) and gives `position_1` …
`position_K`, each [N, 11] probabilities of the digits 0-9 and blank. A user's image file becomes
such an input by `pipeline.images.model_input`, outside the artifact: docs/export.md shows the few
lines around each runtime. tflite-int8 is calibrated on 500 validation sequences (MNIST
train[55000:]) of the layout the model was trained on.
"""

from __future__ import annotations

import startup  # noqa: F401  (first: a quiet Ctrl-C while the libraries load; TensorFlow configured)

# isort: split
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from model import artifacts, trained
from pipeline import export, flags
from pipeline.mnist import load_pool
from pipeline.sequences import SequenceConfig, fixed_set

PROG = "export.py"
CALIBRATION_EXAMPLES = 500  # validation sequences for int8's ranges (TFLite's guide: a few hundred)
BENCHMARK_EXAMPLES = 1000  # test sequences each artifact reads for its throughput


def model_file(path: Path) -> Path:
    """MODEL → its model.h5 (a workdir's, or the file itself)."""
    if path.is_dir():
        if not (path / "model.h5").is_file():
            raise ValueError(f"{path} holds no model.h5: train it to the end first (python train.py --workdir {path})")
        return path / "model.h5"
    return path


def output_path(model_h5: Path, format_name: str, out: Path | None) -> Path:
    """Where the artifact goes, checked before any work: beside model.h5 by default."""
    stem = model_h5.name.removesuffix(".h5")
    out = out or model_h5.with_name(artifacts.FORMATS[format_name].file_name.format(stem=stem))
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"cannot write {out}: {parent} is a file, not a folder; pick another --out")
    if format_name == "saved_model":
        if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "saved_model.pb").is_file())):
            raise ValueError(f"{out} exists and is not a SavedModel folder; pick another --out")
    elif out.is_dir():
        raise ValueError(f"{out} is a folder; --out names the file to write (e.g. {out / Path(stem).name}.tflite)")
    return out


def sequences(model: trained.Trained, split: str, count: int, layout: str, args) -> tuple[np.ndarray, np.ndarray]:
    """`count` sequences of `split` digits in `layout`, shaped as the model reads: uint8 [N, H, W], labels."""
    config = SequenceConfig(model.network.positions, model.image_size, layout=layout)
    return fixed_set(load_pool(split, args.data_dir, args.mnist_dir), config, count)


def export_one(model_h5: Path, model: trained.Trained, format_name: str, out: Path, args) -> str:
    """Writes one artifact; returns the line that says what was written."""
    calibration = None
    if format_name == "tflite-int8":
        calibration, _ = sequences(model, "validation", CALIBRATION_EXAMPLES, model.layout, args)
    artifacts.write(artifacts.serving_model(model_h5), format_name, out, calibration)
    height, width = model.image_size
    positions = model.network.positions
    return (
        f"wrote {out} ({artifacts.size_bytes(out) / 1e6:.2f} MB, {format_name}): input `image` uint8 "
        f"[N, {height}, {width}, 1], outputs `position_1` … `position_{positions}`, [N, 11] probabilities each; "
        f"an image file becomes its input by pipeline.images.model_input(path, ({height}, {width}), {positions}, "
        f"{model.reads!r})"
    )


def benchmark(model_h5: Path, model: trained.Trained, args) -> None:
    """Exports every format, then times model.h5 in Flax and each artifact in its runtime, each in a
    process of its own (as a service would hold it: its runtime alone, its default threads)."""
    for fmt in artifacts.FORMATS.values():
        artifacts.require((*fmt.writer_needs, fmt.runtime), "the benchmark")
    with tempfile.TemporaryDirectory(prefix="digitseq_export_") as temporary:
        rows = _time_every_format(model_h5, model, args.out or Path(temporary), args)
    print(json.dumps({"model": str(model_h5), "cpu": artifacts.cpu_name(), "layout": model.reads, "rows": rows}))


def _time_every_format(model_h5: Path, model: trained.Trained, folder: Path, args) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = sequences(model, "test", BENCHMARK_EXAMPLES, model.reads, args)
    data = folder / "test.npz"
    export.write(data, images, labels, {})
    paths = [model_h5]
    for name, fmt in artifacts.FORMATS.items():
        out = folder / fmt.file_name.format(stem="model")
        print(export_one(model_h5, model, name, out, args), flush=True)
        paths.append(out)
    rows = []
    for path in paths:
        result = subprocess.run(
            [sys.executable, "-m", "model.artifacts", str(path), "--images", str(data)],
            capture_output=True, text=True, cwd=Path(__file__).resolve().parent,
            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"},
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"timing {path} failed:\n{result.stderr[-2000:]}")
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    flax = np.array(rows[0]["predictions"])
    names = ["flax (predict.py)", *artifacts.FORMATS]
    print(f"{model_h5} on {artifacts.cpu_name()}; {len(images):,} {model.reads}-layout test sequences")
    print(f"{'':19} {'size MB':>8} {'1 image ms':>11} {'images/s':>9} {'sequence acc':>13} {'same as flax':>13}")
    for name, row in zip(names, rows, strict=True):
        row["runtime"] = name
        row["same_predictions_as_flax"] = float((np.array(row.pop("predictions")) == flax).all(-1).mean())
        print(
            f"{name:19} {row['size_bytes'] / 1e6:8.2f} {row['latency_ms']:11.2f} {row['images_per_s']:9,.0f} "
            f"{row['sequence_accuracy']:13.2%} {row['same_predictions_as_flax']:13.2%}"
        )
    return rows


def main(argv: list[str] | None = None) -> int | None:
    formats = "\n".join(f"  {name:12} {fmt.use}" for name, fmt in artifacts.FORMATS.items())
    parser = flags.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"formats:\n{formats}\n\n{__doc__.split(chr(10) * 2, 1)[1]}",
    )  # fmt: skip
    parser.add_argument("model", type=Path, metavar="MODEL", help="a model.h5 written by train.py, or its workdir")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--format", choices=artifacts.FORMATS, help="what to write (the formats are below)")
    what.add_argument(
        "--benchmark", action="store_true",
        help=f"export every format, then time Flax (predict.py's path) and each artifact in its runtime on this "
        f"CPU: file size, one-image latency (median of 200), throughput and accuracy on {BENCHMARK_EXAMPLES:,} "
        "test sequences; JSON last line",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path,
        help="the artifact's path (default: beside model.h5: model.onnx, model.tflite, model_int8.tflite, "
        "model_saved_model/); with --benchmark, a folder to keep the artifacts in (default: a temporary one)",
    )  # fmt: skip
    flags.add_data_flags(parser)
    args = parser.parse_args(argv)

    model_h5 = model_file(args.model)
    model = trained.from_weights(model_h5)  # a file that is not a model.h5 is refused here, in one line
    if args.benchmark:
        if args.out and args.out.exists() and not args.out.is_dir():
            raise ValueError(f"{args.out} is a file; with --benchmark, --out names a folder")
        benchmark(model_h5, model, args)
        return
    out = output_path(model_h5, args.format, args.out)
    print(export_one(model_h5, model, args.format, out, args))


if __name__ == "__main__":
    flags.exit_with(main, PROG)
