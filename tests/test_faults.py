"""Faults, each reproduced for real: what the commands say (one line) and what they keep on disk."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, TINY_EPOCH, only_line, run
from PIL import Image

from model import keras_h5, training
from model import networks as nets
from model.checkpoints import Checkpoints
from model.workdir import Workdir
from pipeline import export


def train(workdir: Path, *flags: str) -> subprocess.CompletedProcess:
    return run("train.py", "--workdir", str(workdir), *TINY, *flags)


def model_weights(path: Path) -> dict:
    return keras_h5.read(path).variables


def same(a: dict, b: dict) -> bool:
    import jax

    pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in pairs)


def truncate_checkpoint(folder: Path) -> None:
    """Cuts the largest file of a checkpoint in half, as a full disk or a killed copy leaves it."""
    largest = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    os.truncate(largest, largest.stat().st_size // 2)


@pytest.mark.slow
def test_outputs_never_fall_behind_the_checkpoint_nor_get_wiped(tmp_path, mnist_dir):
    workdir = Workdir(tmp_path / "run")
    assert train(workdir.path, "--max-steps", str(TINY_EPOCH)).returncode == 0
    assert keras_h5.recorded_step(workdir.model) == TINY_EPOCH

    # model.h5 cannot be written (a folder stands where its partial file goes): one line, like a failed
    # checkpoint; the previous model.h5 is kept whole.
    blocker = workdir.path / ".model.h5.partial"
    blocker.mkdir()
    stopped = train(workdir.path)
    assert stopped.returncode == 1
    assert only_line(stopped.stderr) == (
        f"train.py: writing {workdir.model} failed (Is a directory); the checkpoint of step {2 * TINY_EPOCH} is "
        "intact; once that is put right, rerun the same command to continue"
    )
    assert keras_h5.recorded_step(workdir.model) == TINY_EPOCH
    # The rerun finds the run complete and brings model.h5 up to its checkpoint.
    blocker.rmdir()
    rerun = train(workdir.path)
    assert rerun.returncode == 0, rerun.stderr
    assert f"wrote {workdir.model} of step {2 * TINY_EPOCH}" in rerun.stdout and "nothing to do" in rerun.stdout
    assert keras_h5.recorded_step(workdir.model) == 2 * TINY_EPOCH
    final = model_weights(workdir.model)
    checkpoint = Checkpoints(workdir.checkpoints).restore(2 * TINY_EPOCH)
    assert same(final["params"], checkpoint["params"])

    # A truncated newest checkpoint: set aside with a one-line note; training redoes the steps after the
    # one before, and ends where it had.
    truncate_checkpoint(workdir.checkpoints / str(2 * TINY_EPOCH))
    redone = train(workdir.path)
    assert redone.returncode == 0, redone.stderr
    assert only_line(redone.stderr).startswith(
        f"train.py: note: checkpoint {workdir.checkpoints / str(2 * TINY_EPOCH)} cannot be read ("
    )
    assert f"moved aside to {2 * TINY_EPOCH}.damaged; using the one before" in redone.stderr
    assert f"resuming {workdir.path} at step {TINY_EPOCH}" in redone.stdout
    assert same(model_weights(workdir.model), final)
    assert [r["step"] for r in workdir.read_metrics()] == [TINY_EPOCH, 2 * TINY_EPOCH]

    # Checkpoints deleted by hand: the model and metrics are not wiped without --no-resume.
    shutil.rmtree(workdir.checkpoints)
    refused = train(workdir.path)
    assert refused.returncode == 2
    assert "holds a model.h5 but no checkpoint to continue from" in only_line(refused.stderr)
    assert same(model_weights(workdir.model), final) and len(workdir.read_metrics()) == 2


@pytest.mark.slow
def test_eval_skips_damaged_and_non_finite_checkpoints(trained_workdir, tmp_path):
    workdir = Workdir(tmp_path / "copy")
    shutil.copytree(trained_workdir, workdir.path)
    checkpoints = Checkpoints(workdir.checkpoints, writer=True)
    steps = checkpoints.all_steps()
    best, newest = checkpoints.best_step(), max(steps)
    earlier = max(s for s in steps if s != best)
    # A checkpoint whose parameters are NaN (as a learning rate of inf once produced), newest of all.
    state = checkpoints.restore(newest)
    state["params"] = {name: {k: np.full_like(v, np.nan) for k, v in p.items()} for name, p in state["params"].items()}
    checkpoints.save(newest + 1, state)
    truncate_checkpoint(workdir.checkpoints / str(best))

    result = run("eval.py", "--workdir", str(workdir.path), "--checkpoint", "best", "--examples", "200")
    assert result.returncode == 0, result.stderr
    notes = result.stderr.strip().splitlines()
    assert len(notes) == 2 and all(line.startswith("note: checkpoint ") for line in notes), result.stderr
    assert f"{best} cannot be read" in notes[0] and "holds parameters that are not finite" in notes[1]
    assert f"step {earlier} " in result.stdout.splitlines()[0]
    assert sorted(checkpoints.all_steps()) == sorted([*steps, newest + 1])  # a reader moves nothing


@pytest.mark.parametrize("when", ["opening", "reloading"])
def test_a_checkpoint_removed_between_two_looks_is_passed_over(tmp_path, monkeypatch, when):
    """The trainer removes an old checkpoint just as a reader's orbax has seen the folder exist and
    is asking whether it is a folder (orbax says NotADirectoryError): the reader takes the next newest."""
    import inspect

    from etils import epath

    writer = Checkpoints(tmp_path, writer=True)
    for step in (1, 2, 3):
        writer.save(step, {"params": {"w": np.full(3, step, np.float32)}})
    removed = tmp_path.absolute() / "3"
    path_type = type(epath.Path(removed))
    exists = path_type.exists

    def exists_then_removed(path) -> bool:
        answer = exists(path)
        if answer and str(path) == str(removed) and inspect.stack()[1].function == "_sanitize_metadata_path":
            shutil.rmtree(removed)
        return answer

    reader = Checkpoints(tmp_path) if when == "reloading" else None
    monkeypatch.setattr(path_type, "exists", exists_then_removed)
    reader = reader or Checkpoints(tmp_path)
    step, state = reader.restore_good()
    assert not removed.exists(), "orbax no longer looks twice: this test no longer reproduces the race"
    assert step == 2 and state["params"]["w"].tolist() == [2, 2, 2]


def test_all_finite_sees_one_nan():
    tree = {"a": np.ones((3, 3), np.float32), "b": {"c": np.zeros(4, np.float32)}}
    assert bool(training.all_finite(tree))
    tree["b"]["c"][2] = np.nan
    assert not bool(training.all_finite(tree))
    tree["b"]["c"][2] = np.inf
    assert not bool(training.all_finite(tree))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    """An untrained 2-position default network as model.h5 (bad input is refused before it predicts)."""
    path = tmp_path_factory.mktemp("model") / "model.h5"
    network, shape = nets.build(nets.DEFAULT, 2), (28, 56)
    keras_h5.write(path, network, shape, nets.init_variables(network, shape, 0), "default", step=0)
    return path


def test_bad_data_files_get_one_line(small_model, tmp_path):
    empty = tmp_path / "empty.npz"
    empty.write_bytes(b"")
    result = run("eval.py", "--weights", str(small_model), "--data", str(empty))
    assert result.returncode == 2
    assert f"{empty} is not a readable sequence file" in only_line(result.stderr)

    floats = tmp_path / "floats.npz"
    np.savez(floats, images=np.zeros((2, 28, 56), np.uint8), labels=np.array([[3.5, 10], [1, 2]]))
    with pytest.raises(ValueError, match="labels must be whole numbers"):
        export.read(floats)
    np.savez(floats, images=np.zeros((2, 28, 56), np.uint8), labels=np.array([[3.0, 10], [1, 2]]))
    assert export.read(floats)[1].tolist() == [[3, 10], [1, 2]]


def test_paths_and_damaged_workdir_files_get_one_line(small_model, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("in the way")
    result = run("train.py", "--workdir", str(a_file / "run"))
    assert result.returncode == 2 and "a file stands in its path" in only_line(result.stderr)
    result = run("eval.py", "--weights", str(small_model), "--examples", "10", "--plots", str(a_file / "plots"))
    assert result.returncode == 2 and "a file stands in its path" in only_line(result.stderr)

    workdir = Workdir(tmp_path / "run")
    workdir.path.mkdir()
    workdir.config_file.write_text('{"preset": "def')
    result = run("eval.py", "--workdir", str(workdir.path))
    assert result.returncode == 2 and f"{workdir.config_file} is damaged" in only_line(result.stderr)
    workdir.metrics_file.write_text('{"step": 8}\n{"step": 1')
    with pytest.raises(ValueError, match=f"{workdir.metrics_file} is damaged at line 2"):
        workdir.read_metrics()


def test_a_model_h5_that_disagrees_with_itself_is_one_sentence(small_model, tmp_path):
    import h5py

    edited = tmp_path / "edited.h5"
    shutil.copy(small_model, edited)
    with h5py.File(edited, "r+") as f:
        f.attrs["digitseq"] = f.attrs["digitseq"].replace("[28, 56]", "[28, -5]")
    with pytest.raises(keras_h5.ModelFileError, match="does not make a network") as error:
        keras_h5.read(edited)
    assert "\n" not in str(error.value)


def test_a_model_h5_with_a_nan_weight_is_refused_by_eval_and_predict(small_model, tmp_path):
    import h5py

    poisoned = tmp_path / "poisoned.h5"
    shutil.copy(small_model, poisoned)
    with h5py.File(poisoned, "r+") as f:
        f["model_weights/bn1/bn1/beta"][0] = np.nan
    image = tmp_path / "digits.png"
    Image.fromarray(np.zeros((28, 56), np.uint8)).save(image)
    expected = f"{poisoned} holds NaN or infinite weights (first in bn1/beta): it cannot predict anything"
    for args in (["eval.py", "--examples", "100"], ["predict.py", str(image)]):
        result = run(*args, "--weights", str(poisoned))
        assert result.returncode == 2 and only_line(result.stderr).startswith(f"{args[0]}: error: {expected}")


def test_a_partial_file_left_by_a_kill_is_replaced(tmp_path):
    out = tmp_path / "test.npz"
    leftover = tmp_path / ".test.npz.partial"
    leftover.write_bytes(b"half of an export killed with -9")
    export.write(out, np.zeros((1, 28, 28), np.uint8), np.zeros((1, 1), np.int32), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.npz"]


@pytest.mark.slow
def test_a_workdir_keeps_its_own_network_when_the_preset_changes(tmp_path, monkeypatch, mnist_dir):
    import dataclasses
    import json

    from model import trained

    workdir = Workdir(tmp_path / "run")
    assert train(workdir.path, "--max-steps", str(TINY_EPOCH)).returncode == 0
    original = nets.DEFAULT.layers
    assert nets.layers_from_json(workdir.read_config()["layers"]) == original
    # Today's default preset gets a narrower first convolution than the one the run was trained with.
    narrower = tuple(
        dataclasses.replace(layer, features=16) if getattr(layer, "name", "") == "conv1" else layer
        for layer in original
    )
    assert narrower != original
    monkeypatch.setitem(nets.PRESETS, "default", dataclasses.replace(nets.DEFAULT, layers=narrower))

    model = trained.from_workdir(workdir.path)
    assert model.network.layers == original
    nets.probabilities(model.network, model.variables, np.zeros((1, 28, 28, 1), np.uint8))

    # Resumed in-process (where the changed preset is in force), it finishes with its own network.
    assert train(workdir.path).returncode == 0
    assert keras_h5.read(workdir.model).network.layers == original
    assert keras_h5.recorded_step(workdir.model) == 2 * TINY_EPOCH

    # A workdir that does not record its network: today's preset only if its checkpoint fits it exactly.
    config = workdir.read_config()
    del config["layers"]
    workdir.config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="does not record its network and its checkpoint does not fit"):
        trained.from_workdir(workdir.path)
    monkeypatch.setitem(nets.PRESETS, "default", nets.DEFAULT)
    assert trained.from_workdir(workdir.path).network.layers == original
