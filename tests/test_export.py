"""export.py: each artifact run in its own runtime gives what eval.py's model gives; bad input in one line."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, command, run
from handwritten import write_numbers

from digitseq import Reader
from model import artifacts, judge, keras_h5, trained
from model import networks as nets
from model.checkpoints import Checkpoints
from model.workdir import Workdir
from pipeline.sequences import SequenceConfig, fixed_set

pytestmark = pytest.mark.slow  # they export models trained for them
FLOATS = ("saved_model", "tflite", "onnx")
TEST_EXAMPLES = 2000


@pytest.fixture(scope="module")
def judged_model(trained_workdir, tmp_path_factory) -> Path:
    """A fine-tuned model with its judge of the hand (model/judge.py), two networks side by side: the
    trained default preset's checkpoints at steps 200 (the start) and 250 (the fine-tuned), and a judge in
    two minds (p ≈ 0.6, varying by image), so that both networks' probabilities show in every output."""
    single = trained.from_workdir(trained_workdir)
    checkpoints = Checkpoints(Workdir(trained_workdir).checkpoints)
    states = [checkpoints.restore(step) for step in (200, 250)]
    start, tuned = ({"params": state["params"], "batch_stats": state["batch_stats"]} for state in states)
    shape = nets.variables_structure(nets.Network(single.network.layers, single.network.positions, 2, judged=True),
                                     single.image_size)["params"]["judge"]["kernel"].shape  # fmt: skip
    kernel = np.random.default_rng(0).normal(0, 1e-3, shape).astype(np.float32)
    network, variables = judge.judged(single.network, start, tuned, {"kernel": kernel, "bias": np.float32([0.4])})
    path = tmp_path_factory.mktemp("judged") / "model.h5"
    keras_h5.write(path, network, single.image_size, variables, "default", layout=single.layout)
    return path


def _sequences(pools, model: keras_h5.ModelFile, split: str, count: int, layout: str):
    config = SequenceConfig(model.network.positions, model.image_size, layout=layout)
    return fixed_set(pools[split], config, count)


@pytest.fixture(scope="module")
def exports(trained_workdir, judged_model, seed_model, pools, tmp_path_factory) -> dict:
    """Every format of each model. The default preset's ONNX and int8 TFLite (its own calibration set) are
    written by the export.py command, into the workdir; the rest by the functions it runs, in this process."""
    for name in ("onnx", "tflite-int8"):  # the first as a user types it, in a process of its own
        result = (command if name == "onnx" else run)("export.py", str(trained_workdir), "--format", name)
        assert result.returncode == 0, result.stderr
        assert result.stderr == "", result.stderr  # the converters' chatter stays out
        assert "pipeline.images.model_input(path, (28, 56), 2, 'free')" in result.stdout
    folder = tmp_path_factory.mktemp("exports")
    default_name = lambda name: artifacts.FORMATS[name].file_name.format(stem="model")  # noqa: E731
    out = {"default": {name: trained_workdir / default_name(name) for name in ("onnx", "tflite-int8")}}
    for label, path in (("default", trained_workdir / "model.h5"), ("judged", judged_model), ("seed", seed_model)):
        model = keras_h5.read(path)
        calibration, _ = _sequences(pools, model, "validation", 500, model.layout)
        serving = artifacts.serving_model(path)
        out.setdefault(label, {})
        for name in artifacts.FORMATS:
            if name not in out[label]:
                target = folder / label / default_name(name)
                artifacts.write(serving, name, target, calibration if name == "tflite-int8" else None)
                out[label][name] = target
    out["h5"] = {"default": trained_workdir / "model.h5", "judged": judged_model, "seed": seed_model}
    return out


@pytest.mark.parametrize("label", ["default", "judged", "seed"])
def test_each_artifact_in_its_runtime_gives_what_eval_py_gives(exports, pools, label):
    """2,000 test sequences: float artifacts within 1e-4 of eval.py's model with the same predictions;
    int8 within 0.3 points of float's sequence accuracy at a third of its size or less."""
    model_h5 = exports["h5"][label]
    model = keras_h5.read(model_h5)
    reads = trained.from_weights(model_h5).reads
    images, labels = _sequences(pools, model, "test", TEST_EXAMPLES, reads)
    images = images[..., None]
    expected = nets.read_in_batches(model.network, model.variables, images)  # eval.py's network and weights
    accuracy = lambda p: (p.argmax(-1) == labels).all(-1).mean()  # noqa: E731
    assert accuracy(expected) > 0.8  # a model that reads: agreement below means something
    for name in FLOATS:
        got = artifacts.runtime(exports[label][name])(images)
        assert got.shape == expected.shape, name
        assert np.abs(got - expected).max() < 1e-4, name
        assert (got.argmax(-1) == expected.argmax(-1)).all(), name
    quantized = artifacts.runtime(exports[label]["tflite-int8"])(images)
    assert abs(accuracy(quantized) - accuracy(expected)) <= 0.003
    sizes = {name: artifacts.size_bytes(exports[label][name]) for name in ("tflite", "tflite-int8")}
    # (A judged model's start reader stays float in int8: the converter keeps the feature map it shares
    # with the judge in float, and what reads it; docs/export.md.)
    assert sizes["tflite-int8"] <= sizes["tflite"] * (0.4 if label == "judged" else 1 / 3), sizes


def _docs_blocks() -> list[str]:
    text = (ROOT / "docs" / "export.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


@pytest.mark.parametrize("format_name", ["onnx", "tflite-int8", "saved_model"])
def test_the_lines_in_the_docs_read_image_files(exports, trained_workdir, tmp_path, format_name):
    """docs/export.md's blocks, run as written (the model's shape and path filled in), read a user's PNGs
    of touching numbers as predict.py's library reads them."""
    frame, *runtimes, read_digits = _docs_blocks()
    artifact = exports["default"][format_name]
    runtime = next(block for block in runtimes if f"runs/default/{artifact.name}" in block)
    numbers = write_numbers(tmp_path, "touching", 6, 2)
    expected = [reading.digits for reading in Reader.load(trained_workdir / "model.h5").read(p for p, _ in numbers)]
    frame = frame.replace('(28, 140), 5, "free"', '(28, 56), 2, "free"')
    assert frame != _docs_blocks()[0]  # the docs' constants line is still there to fill in
    runtime = runtime.replace("runs/default/", f"{artifact.parent}/")
    got = []
    for path, _ in numbers:
        scope: dict = {}
        exec(frame.replace('"scan.png"', repr(str(path))) + runtime + read_digits, scope)
        got.append(scope["digits"])
    assert got == expected


def test_bad_input_is_one_line(trained_workdir, tmp_path, monkeypatch):
    model_h5 = str(trained_workdir / "model.h5")
    not_a_model = tmp_path / "notes.h5"
    not_a_model.write_text("not HDF5")
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    cases = [
        ([str(not_a_model), "--format", "onnx"], "is not a readable HDF5 file"),
        ([str(tmp_path), "--format", "onnx"], "holds no model.h5"),
        ([model_h5, "--format", "coreml"], "invalid choice: 'coreml'"),
        ([model_h5, "--format", "onnx", "--out", str(a_file / "model.onnx")], f"{a_file} is a file, not a folder"),
        ([model_h5, "--format", "tflite", "--out", str(tmp_path)], "is a folder; --out names the file"),
    ]
    for args, message in cases:
        result = run("export.py", *args)
        assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1, (args, result)
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # not installed: importing it fails
    result = run("export.py", model_h5, "--format", "onnx", "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "needs tf2onnx, which is not installed: pip install -e '.[export]'" in result.stderr
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob(".*partial"))


def test_a_failed_export_leaves_the_previous_artifact(exports, tmp_path, monkeypatch):
    """A converter that fails part-way: the artifact already at --out is untouched, no partial is left."""
    target = tmp_path / "model.tflite"
    shutil.copy(exports["default"]["tflite"], target)
    before = target.read_bytes()
    monkeypatch.setattr(artifacts, "_tflite_bytes", lambda *_: (_ for _ in ()).throw(RuntimeError("converter")))
    with pytest.raises(RuntimeError, match="converter"):
        artifacts.write(artifacts.serving_model(exports["h5"]["default"]), "tflite", target)
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["model.tflite"]


def test_benchmark_prints_json_last(trained_workdir, tmp_path):
    """--benchmark: every format written, each timed in its runtime beside Flax; the figures as JSON last."""
    result = run("export.py", str(trained_workdir), "--benchmark", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    rows = {row["runtime"]: row for row in figures["rows"]}
    assert list(rows) == ["flax (predict.py)", *artifacts.FORMATS]
    for row in rows.values():
        assert row["latency_ms"] > 0 and row["images_per_s"] > 0 and row["images"] == 1000
    assert all(rows[name]["same_predictions_as_flax"] == 1.0 for name in FLOATS)
    assert rows["tflite-int8"]["size_bytes"] <= rows["tflite"]["size_bytes"] / 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["test.npz", *(fmt.file_name.format(stem="model") for fmt in artifacts.FORMATS.values())]
    )
