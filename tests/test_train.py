"""train.py run for real on MNIST: the workdir it writes, its flags, the recipes, resume rules, NaN stop.

Where the process itself is the subject (signals, two processes, a full disk): test_signals.py,
test_processes.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, command, run, steps_saved, weights

from model import keras_h5
from model.recipes import RECIPES

QUICK = ["--val-examples", "200"]


def train(workdir: Path, *flags: str) -> subprocess.CompletedProcess:
    """train.py in this process, as rerunning a command in a shell does."""
    return run("train.py", "--workdir", str(workdir), *QUICK, *flags)


@pytest.mark.slow
def test_seed_preset_writes_the_whole_workdir(tmp_path, mnist_dir):
    workdir = tmp_path / "seed"
    # As a user types it, in a process of its own (the other tests of the command call it in this one).
    result = command("train.py", "--workdir", str(workdir), *QUICK, "--preset", "seed", "--epochs", "1",
                     "--max-steps", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "val_sequence_acc" in result.stdout and "done at step 4" in result.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["preset"] == "seed" and config["image_size"] == [64, 64] and config["train_examples"] == 60000
    assert config["layout"] == "cells"
    (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 4 and {"loss", "position_5_acc", "val_sequence_acc", "val_loss"} <= set(record)
    assert [p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()] == ["4"]
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    model = keras.models.load_model(workdir / "model.h5")
    assert model.inputs[0].shape[1:] == (64, 64, 1) and len(model.outputs) == 5

    again = train(workdir, "--preset", "seed", "--epochs", "1", "--max-steps", "4")
    assert again.returncode == 0 and "nothing to do" in again.stdout


@pytest.mark.slow
def test_time_budget_stops_validated_and_saved(tmp_path, mnist_dir):
    # A budget spent before the first step ends (loading MNIST and compiling take longer on any machine):
    # the run stops after that one step, validated and saved, whatever the machine's speed.
    workdir = tmp_path / "budget"
    result = train(workdir, "--max-digits", "1", "--time-budget", "0.001")
    assert result.returncode == 0, result.stderr
    planned = RECIPES["default"].epochs * 937  # 60,000 sequences an epoch at batch 64
    assert f"time budget of 0.001 min is spent: stopped at step 1 of {planned}" in result.stdout
    assert "everything saved" in result.stdout
    (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and 0 < record["epoch"] < 1 and "val_sequence_acc" in record
    assert steps_saved(workdir) == [1] and (workdir / "model.h5").is_file()
    # The default recipe trains on the mixed layout, and both config.json and model.h5 say so.
    assert json.loads((workdir / "config.json").read_text())["layout"] == "mixed"
    assert keras_h5.read(workdir / "model.h5").layout == "mixed"
    # The default recipe's cosine schedule is planned over its epochs: continuing under others is refused.
    other = train(workdir, "--max-digits", "1", "--epochs", "3")
    assert other.returncode == 2 and f"holds a run trained with epochs={RECIPES['default'].epochs}" in other.stderr
    other = train(workdir, "--max-digits", "1", "--layout", "cells")
    assert other.returncode == 2 and "holds a run trained with layout='mixed'" in other.stderr
    other = train(workdir, "--max-digits", "1", "--distortions", "none")
    assert other.returncode == 2 and "holds a run trained with distortions=['thickness', 'blur'," in other.stderr
    # Another preset: the refusal alone, no note before it that the run would go on with its own network.
    other = train(workdir, "--max-digits", "1", "--preset", "seed")
    assert other.returncode == 2 and len(other.stderr.strip().splitlines()) == 1, other.stderr
    assert "holds a run trained with preset='default'" in other.stderr


@pytest.mark.slow
def test_an_ensemble_trains_in_one_step_and_resumes_bit_identical(tmp_path, mnist_dir):
    recipe = ["--max-digits", "2", "--batch-size", "32", "--checkpoint-every", "4"]
    straight = train(tmp_path / "straight", "--ensemble", "2", *recipe, "--max-steps", "8")
    assert straight.returncode == 0, straight.stderr
    workdir = tmp_path / "resumed"
    assert train(workdir, "--ensemble", "2", *recipe, "--max-steps", "3").returncode == 0
    resumed = train(workdir, *recipe, "--max-steps", "8")  # without --ensemble: the run's recorded one
    assert resumed.returncode == 0 and f"resuming {workdir} at step 3" in resumed.stdout, resumed.stderr
    assert json.loads((workdir / "config.json").read_text())["ensemble"] == 2
    ours, theirs = weights(workdir / "model.h5"), weights(tmp_path / "straight" / "model.h5")
    assert ours.keys() == theirs.keys() and {"member_1_conv1", "member_2_conv1"} <= {k.split("/")[0] for k in ours}
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)
    kernels = [ours[f"member_{m}_conv1/member_{m}_conv1/kernel"] for m in (1, 2)]
    assert not np.array_equal(*kernels)  # each member its own initial weights


@pytest.mark.slow
def test_a_run_says_early_how_long_its_steps_left_take(trained_workdir):
    # Measured over steps 2–21 of the run (the first compiles), said at step 21: here 250 steps in all.
    said = (trained_workdir.parent / "stdout.txt").read_text()
    assert re.search(r"^train\.py: about \d+ (s|min) for the 229 steps left \(\d+\.\d steps/s\)$", said, re.M), said


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, mnist_dir):
    result = train(
        tmp_path / "nan",
        "--learning-rate",
        "1e30",
        "--schedule",
        "constant",
        "--max-steps",
        "50",
        "--checkpoint-every",
        "1",
    )
    assert result.returncode == 1
    assert "the loss became nan" in result.stderr and "the last good checkpoint (step 1) is kept" in result.stderr
    assert "Traceback" not in result.stderr
    assert [p.name for p in (tmp_path / "nan" / "checkpoints").iterdir() if p.name.isdigit()] == ["1"]


def test_the_recipes_name_every_distortion_the_pipeline_draws():
    # model/ cannot import pipeline/, so the recipes spell the names out; config.json records them as
    # the recipe orders them, and resume compares them: the two lists must be the same, in order.
    from model.recipes import DISTORTIONS as NAMED
    from pipeline.distort import DISTORTIONS

    assert NAMED == DISTORTIONS and RECIPES["default"].distortions == tuple(n for n in DISTORTIONS if n != "pen")


def test_weight_decay_shrinks_the_kernels_alone_and_only_where_the_recipe_has_it():
    import jax
    import jax.numpy as jnp

    params = {"conv1": {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3)}, "norm": {"scale": jnp.ones(3)}}
    still = jax.tree.map(jnp.zeros_like, params)  # no gradient: whatever moves, the decay moved
    for name, decayed in (("default", {"kernel"}), ("seed", set()), ("accurate", set())):
        optimizer = RECIPES[name].optimizer()
        updates, _ = optimizer.update(still, optimizer.init(params), params)
        moved = {path[-1].key for path, update in jax.tree_util.tree_leaves_with_path(updates) if update.any()}
        assert moved == decayed, name
    assert RECIPES["default"].weight_decay > 0


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--epochs", "-1"], "--epochs: must be at least 1"),
        (["--preset", "big"], "invalid choice: 'big'"),
        (["--max-digits", "0"], "--max-digits: must be at least 1"),
        (["--learning-rate", "0"], "--learning-rate must be positive"),
        (["--learning-rate", "inf"], "--learning-rate must be positive and finite, not inf"),
        (["--weight-decay", "-0.1"], "--weight-decay must be 0 or more and finite, not -0.1"),
        (["--train-examples", "50"], "cannot fill one batch of 64"),
        (["--image-size", "4x4"], "4x4 is too small for the default preset"),
        (["--time-budget", "0"], "--time-budget: must be a positive number of minutes"),
        (["--time-budget", "-inf"], "--time-budget: must be a positive number of minutes, not '-inf'"),
        (["--time-budget", "inf"], "--time-budget: must be a positive number of minutes, not 'inf' (leave it out"),
        (["--num-processes", "2", "--process-id", "2"], "--process-id 2 must be below --num-processes 2"),
        (["--process-id", "-1"], "--process-id: expected a whole number ≥ 0, got '-1'"),
        (["--distortions", "thickness,smudge"], "--distortions: unknown distortion 'smudge': name some of thickness"),
    ],
)
def test_bad_flags_get_one_line(tmp_path, flags, message):
    result = run("train.py", "--workdir", str(tmp_path / "w"), *flags)
    last = result.stderr.strip().splitlines()[-1]  # argparse's usage may come before: nothing else
    assert result.returncode == 2 and last.startswith("train.py: error:") and message in last
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_a_folder_that_is_not_a_workdir_is_left_alone(tmp_path):
    (tmp_path / "model.h5").write_text("someone else's file")
    result = train(tmp_path)
    assert result.returncode == 2 and "holds no digitseq run" in result.stderr
    assert (tmp_path / "model.h5").read_text() == "someone else's file" and len(list(tmp_path.iterdir())) == 1


def test_a_workdir_another_process_of_the_run_is_setting_up_is_not_foreign(tmp_path):
    # Process 0 of a multi-process run takes the lock and writes config.json atomically (a partial file, then
    # a rename); the other processes look at the folder meanwhile and must not call it someone else's.
    from model.workdir import Workdir

    workdir = Workdir(tmp_path)
    (tmp_path / ".lock").write_text("123\n")
    (tmp_path / ".config.json.partial").write_text("{")
    assert not workdir.is_foreign()
    (tmp_path / "notes.txt").write_text("someone else's")
    assert workdir.is_foreign()


def test_a_workdir_recorded_before_layouts_continues_in_cells(tmp_path):
    """A config.json without a layout was written when every run trained on cells (and without weight decay,
    when none had it): rerunning its command continues it so, whatever today's default recipe says."""
    sys.path.insert(0, str(ROOT))
    import train as train_script

    config = {"preset": "default", "max_digits": 5, "ensemble": 1, "image_size": [28, 140], "layers": []}
    (tmp_path / "config.json").write_text(json.dumps(config))
    recipe, _ = train_script.config_from_args(train_script.parse_args(["--workdir", str(tmp_path)]))
    assert recipe.preset == "default" and recipe.layout == "cells" and recipe.weight_decay == 0
    fresh, _ = train_script.config_from_args(train_script.parse_args(["--workdir", str(tmp_path / "new")]))
    assert fresh.layout == "mixed" and fresh.weight_decay == RECIPES["default"].weight_decay > 0
