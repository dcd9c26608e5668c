"""eval.py run for real: the same figures from a workdir's checkpoint and from its model.h5 alone; plots."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import command, run
from PIL import Image

from model import trained
from model.checkpoints import BEST_METRIC, Checkpoints

pytestmark = pytest.mark.slow  # they read a model trained for them (the trained_workdir fixture)

PLOTS = ("examples", "where_looked", "per_position", "confusion", "training_curves", "filters", "activations")


@pytest.fixture(scope="module")
def reports(trained_workdir, tmp_path_factory):
    """eval.py's JSON on 2000 built test sequences, from the checkpoint (with plots) and from model.h5 (of
    the layout the model reads, free), and on the cell layout."""
    out = {}
    folder = tmp_path_factory.mktemp("reports")
    sources = {
        "workdir": ["--workdir", str(trained_workdir), "--plots", str(folder / "plots")],
        "weights": ["--weights", str(trained_workdir / "model.h5")],
        "cells": ["--weights", str(trained_workdir / "model.h5"), "--layout", "cells"],
    }
    for name, source in sources.items():
        path = folder / f"{name}.json"
        how = command if name == "workdir" else run  # the first as a user types it, in a process of its own
        result = how("eval.py", *source, "--examples", "2000", "--json", str(path))
        assert result.returncode == 0, result.stderr
        assert "sequence accuracy" in result.stdout and "length 2" in result.stdout
        out[name] = json.loads(path.read_text())
    out["plots"] = folder / "plots"
    return out


def test_checkpoint_and_model_h5_give_the_same_report(reports):
    a, b = reports["workdir"], reports["weights"]
    assert a["num_examples"] == 2000 and len(a["per_position_accuracy"]) == 2 and len(a["confusion"]) == 11
    assert set(a["per_length_sequence_accuracy"]) == {"1", "2"} and a["examples_per_s"] > 0
    assert sum(map(sum, a["confusion"])) == 2000 * 2
    for key in ("per_position_accuracy", "individual_accuracy", "digit_accuracy", "sequence_accuracy",
                "per_length_sequence_accuracy", "length_accuracy", "confusion"):  # fmt: skip
        assert a[key] == b[key], key


def test_a_workdir_is_read_at_its_latest_checkpoint_unless_best_is_asked_for(trained_workdir, tmp_path):
    workdir = tmp_path / "copy"
    shutil.copytree(trained_workdir, workdir)
    checkpoints = Checkpoints(workdir / "checkpoints", writer=True)
    best = checkpoints.best_step()
    state = checkpoints.restore(best)
    state["params"] = {name: {k: v * 0.5 for k, v in p.items()} for name, p in state["params"].items()}
    checkpoints.save(best + 1, state, {BEST_METRIC: 0.0})  # later, and worse on validation
    result = run("eval.py", "--workdir", str(workdir), "--examples", "100")
    assert result.returncode == 0, result.stderr
    assert f"step {best + 1} " in result.stdout.splitlines()[0]
    assert trained.from_workdir(workdir, "latest").description == f"{workdir} step {best + 1} (default, mixed layout)"
    assert trained.from_workdir(workdir, "best").description == f"{workdir} step {best} (default, mixed layout)"


def test_the_briefly_trained_model_reads_both_layouts(reports):
    assert (
        reports["workdir"]["layout"] == reports["weights"]["layout"] == "free" and reports["cells"]["layout"] == "cells"
    )
    assert reports["workdir"]["sequence_accuracy"] > 0.7 and reports["cells"]["sequence_accuracy"] > 0.88
    assert reports["workdir"]["confusion"] != reports["cells"]["confusion"]


def test_an_exported_file_gives_the_built_set_report(trained_workdir, reports, tmp_path):
    data = tmp_path / "test.npz"
    flags = ["--examples", "2000", "--max-digits", "2", "--layout", "free", "--out", str(data)]
    exported = run("-m", "pipeline.export", *flags)
    assert exported.returncode == 0, exported.stderr
    out = tmp_path / "report.json"
    result = run("eval.py", "--weights", str(trained_workdir / "model.h5"), "--data", str(data), "--json", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["confusion"] == reports["weights"]["confusion"] and report["layout"] is None

    # Sequences of up to 3 digits (28x84) for a model of 2 positions (28x56): one clear sentence.
    wider = tmp_path / "wider.npz"
    exported = run("-m", "pipeline.export", "--examples", "10", "--max-digits", "3", "--out", str(wider))
    assert exported.returncode == 0, exported.stderr
    result = run("eval.py", "--weights", str(trained_workdir / "model.h5"), "--data", str(wider))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds 28x84 images with 3 positions; the model reads 28x56 with 2" in result.stderr


@pytest.mark.parametrize("name", PLOTS)
def test_plots_are_pngs_of_sensible_size(reports, name):
    path = reports["plots"] / f"{name}.png"
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        pixels = np.asarray(image.convert("L"))
    assert 300 <= width <= 2500 and 200 <= height <= 2500
    assert pixels.std() > 10  # something is drawn


@pytest.mark.parametrize(
    "args,message",
    [
        (["--weights", "missing.h5"], "does not exist"),
        (["--workdir", "tests"], "is not a training workdir"),
        ([], "one of the arguments --workdir --weights is required"),
        (["--weights", "m.h5", "--data", "t.npz", "--distortions", "all"], "--data is evaluated as it is"),
        (["--weights", "m.h5", "--distortions", "ink"], "--distortions: unknown distortion 'ink'"),
    ],
)
def test_bad_inputs_get_one_line(args, message):
    result = run("eval.py", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_a_checkpoint_that_does_not_fit_the_recorded_network_is_one_line(trained_workdir, tmp_path):
    workdir = tmp_path / "edited"
    shutil.copytree(trained_workdir, workdir)
    config = json.loads((workdir / "config.json").read_text())
    dense = next(layer for layer in config["layers"] if layer["type"] == "Dense")
    dense["units"] //= 2
    (workdir / "config.json").write_text(json.dumps(config))
    result = run("eval.py", "--workdir", str(workdir), "--examples", "100")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"eval.py: error: {workdir}'s checkpoint does not fit the network its config.json records (the file was "
        "altered); use its model.h5, or train it again with --no-resume"
    ]
