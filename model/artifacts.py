"""model.h5 as an artifact for another runtime — SavedModel, TFLite (float or int8), ONNX — and each
artifact run in its own runtime.

    python -m model.artifacts model.onnx --images test.npz   # times one artifact (or a model.h5, in Flax)

Every artifact takes what the train step takes: uint8 images [N, H, W, 1] named `image`, scaled to
[0, 1] inside, and gives `position_1` … `position_K`, each [N, 11] probabilities (of an ensemble,
the members' mean), the names model.h5's outputs have. The converters are the real ones, run on
the Keras model that model.h5 is: Keras's ExportArchive writes the SavedModel, TensorFlow's Lite
converter turns that graph into TFLite (int8: weights and activations quantized after training,
calibrated on images the caller gives; input and outputs stay as above), and tf2onnx turns the same
graph into ONNX. Framing a user's image (pipeline/images.py) stays outside the artifact.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

EXTRA = "pip install -e '.[export]'"  # what brings the optional converter and runtimes
ONNX_OPSET = 17  # onnxruntime ≥ 1.13, TensorRT 8.6, OpenVINO 2023 read it
THREADS = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class Format:
    name: str
    file_name: str  # the default output, beside model.h5; {stem} is model.h5's name without .h5
    use: str  # what it is for, for --help
    writer_needs: tuple[str, ...] = ()  # modules beyond the main install that writing it needs
    runtime: str = ""  # the module that runs it


FORMATS = {
    f.name: f
    for f in (
        Format(
            "saved_model",
            "{stem}_saved_model",
            "TensorFlow's own (a folder): tf.saved_model.load, TF Serving, the TensorFlow.js and TF-TRT converters",
            runtime="tensorflow",
        ),
        Format(
            "tflite",
            "{stem}.tflite",
            "LiteRT (TensorFlow Lite) on phones and small devices, float32 weights",
            runtime="ai_edge_litert",
        ),
        Format(
            "tflite-int8",
            "{stem}_int8.tflite",
            "LiteRT with int8 weights and activations: about a quarter of the size, calibrated on validation sequences",
            runtime="ai_edge_litert",
        ),
        Format(
            "onnx",
            "{stem}.onnx",
            "ONNX Runtime (servers; browsers through onnxruntime-web), TensorRT, OpenVINO",
            writer_needs=("tf2onnx", "onnx"),
            runtime="onnxruntime",
        ),
    )  # fmt: skip
}


class MissingExtraError(ValueError):
    """A converter or runtime of the optional extra is not installed (one sentence, with the install line)."""


def require(modules: tuple[str, ...], purpose: str) -> None:
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            raise MissingExtraError(f"{purpose} needs {module}, which is not installed: {EXTRA}") from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences what the converters print (C++ lines on the process's stdout and stderr, Python
    warnings, absl and tf2onnx logs): they say nothing a user acts on; a failure still raises."""
    import logging

    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    loggers = [logging.getLogger(name) for name in ("absl", "tensorflow", "tf2onnx")]
    levels = [logger.level for logger in loggers]
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# --- writing -------------------------------------------------------------------------------------


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras

    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"exporting runs Keras on TensorFlow, but KERAS_BACKEND is {keras.backend.backend()!r}; unset it"
        )
    return keras


def serving_model(model_h5: Path):
    """model.h5 → a Keras model that takes uint8 images `image` [N, H, W, 1], scales them to [0, 1]
    (as the train step does) and gives the dict of `position_k` probabilities."""
    keras = _keras()
    with _quiet():
        network = keras.models.load_model(model_h5, compile=False)
    image = keras.Input(network.input_shape[1:], dtype="uint8", name="image")
    scaled = keras.layers.Rescaling(1 / 255, name="to_unit_range")(image)
    return keras.Model(image, dict(zip(network.output_names, network(scaled), strict=True)), name=network.name)


def _signature(model) -> list:
    import tensorflow as tf

    return [tf.TensorSpec([None, *model.input_shape[1:]], tf.uint8, name="image")]


def _write_saved_model(model, folder: Path) -> None:
    # The endpoint tracks the variables it uses; track(model) as well would save each one twice.
    archive = _keras().export.ExportArchive()
    archive.add_endpoint("serve", lambda image: model(image, training=False), input_signature=_signature(model))
    archive.write_out(str(folder), verbose=False)


def _tflite_bytes(model, calibration: np.ndarray | None) -> bytes:
    import tensorflow as tf

    with tempfile.TemporaryDirectory() as folder:  # Keras 3's path to TFLite (its own export's too): a SavedModel
        _write_saved_model(model, Path(folder))
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        if calibration is not None:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = lambda: ({"image": image[None, ..., None]} for image in calibration)
        return converter.convert()


def _onnx_bytes(model) -> bytes:
    import tensorflow as tf
    import tf2onnx

    serve = tf.function(lambda image: model(image, training=False))
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=_signature(model), opset=ONNX_OPSET)
    return proto.SerializeToString()


def write(model, format_name: str, out: Path, calibration: np.ndarray | None = None) -> None:
    """Writes `model` (from serving_model) as `format_name` to `out`, whole or not at all: built beside
    it under a hidden name and renamed into place, so a failure leaves whatever `out` was.
    `calibration`: uint8 images [N, H, W] for tflite-int8's quantization ranges."""
    fmt = FORMATS[format_name]
    require(fmt.writer_needs, f"the {format_name} format")
    if format_name == "tflite-int8" and calibration is None:
        raise ValueError("tflite-int8 needs calibration images")
    partial = out.with_name(f".{out.name}.partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove(partial)  # what a killed export left
    try:
        with _quiet():
            if format_name == "saved_model":
                _write_saved_model(model, partial)
            else:
                data = _onnx_bytes(model) if format_name == "onnx" else _tflite_bytes(model, calibration)
                partial.write_bytes(data)
        if out.is_dir() and not out.is_symlink():
            shutil.rmtree(out)
        os.replace(partial, out)
    finally:
        _remove(partial)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def size_bytes(path: Path) -> int:
    """A file's size, or a folder's (a SavedModel): all the files in it."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


# --- running -------------------------------------------------------------------------------------


def format_of(path: Path) -> str:
    """What an artifact is, from its name: "flax" for a model.h5."""
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return "saved_model"
    if path.suffix == ".h5":
        return "flax"
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".tflite":
        return "tflite"
    raise ValueError(f"{path} is not an artifact this reads (a SavedModel folder, .tflite, .onnx or model.h5)")


def runtime(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """The artifact at `path` in its own runtime, as a function: uint8 images [N, H, W, 1] →
    probabilities [N, positions, 11]. A model.h5 runs in Flax, batched as predict.py reads."""
    kind = format_of(path)
    if kind == "flax":
        from model import keras_h5
        from model import networks as nets

        model = keras_h5.read(path)
        return lambda images: nets.read_in_batches(model.network, model.variables, images)
    require((FORMATS[kind].runtime,), f"running {path.name}")
    if kind == "saved_model":
        import tensorflow as tf

        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda images: _stacked({k: v.numpy() for k, v in serve(image=tf.constant(images)).items()})
    if kind == "tflite":
        from ai_edge_litert.interpreter import Interpreter

        runner = Interpreter(model_path=str(path), num_threads=THREADS).get_signature_runner()
        return lambda images: _stacked(runner(image=images))
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return lambda images: _stacked(dict(zip(names, session.run(names, {"image": images}), strict=True)))


def _stacked(outputs: dict[str, np.ndarray]) -> np.ndarray:
    """{position_k: [N, 11]} → [N, K, 11], positions in order."""
    names = sorted(outputs, key=lambda name: int(name.rsplit("_", 1)[1]))
    return np.stack([np.asarray(outputs[name]) for name in names], axis=1)


# --- timing: python -m model.artifacts -----------------------------------------------------------


def cpu_name() -> str:
    """This machine's CPU, as /proc/cpuinfo names it, and whether it has AVX-512."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return f"{name or 'unknown CPU'}, {vector}, {THREADS} cores"


def timing(path: Path, images: np.ndarray, labels: np.ndarray, latency_runs: int = 200) -> dict:
    """Size, one-image latency (median of `latency_runs`, each a different image) and throughput
    (the whole set, READ_BATCH images a call, median of 3) of one artifact, and its sequence
    accuracy on `labels`."""
    from model.networks import READ_BATCH

    run = runtime(path)
    batched = lambda: np.concatenate([run(images[i : i + READ_BATCH]) for i in range(0, len(images), READ_BATCH)])  # noqa: E731
    batched()  # warm-up: compiles (Flax) or allocates (the others) every shape timed below
    run(images[:1])
    latencies = []
    for i in range(latency_runs):
        started = time.perf_counter()
        run(images[i % len(images)][None])
        latencies.append(time.perf_counter() - started)
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        probabilities = batched()
        seconds.append(time.perf_counter() - started)
    predicted = probabilities.argmax(-1)
    return {
        "artifact": str(path),
        "format": format_of(path),
        "size_bytes": size_bytes(path),
        "latency_ms": statistics.median(latencies) * 1e3,
        "images_per_s": len(images) / statistics.median(seconds),
        "sequence_accuracy": float((predicted == labels).all(-1).mean()),
        "images": len(images),
        "threads": THREADS,
        "predictions": predicted.tolist(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m model.artifacts", description=__doc__.split("\n\n")[0])
    parser.add_argument("artifact", type=Path, help="a SavedModel folder, .tflite, .onnx, or a model.h5 (Flax)")
    parser.add_argument(
        "--images", type=Path, required=True, help="an .npz of images and labels (python -m pipeline.export)"
    )
    parser.add_argument("--latency-runs", type=int, default=200, help="one-image calls timed (default: 200)")
    args = parser.parse_args(argv)
    with np.load(args.images) as data:
        images, labels = data["images"][..., None], data["labels"]
    figures = timing(args.artifact, images, labels, args.latency_runs)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
