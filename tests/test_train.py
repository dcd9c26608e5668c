"""train.py run for real on MNIST: the workdir it writes, exact resume, NaN stop, data parallel."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT

QUICK = ["--val-examples", "200"]


def train(workdir: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", "--workdir", str(workdir), *QUICK, *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def weights(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        f["model_weights"].visititems(lambda name, obj: out.update({name: obj[()]}) if hasattr(obj, "shape") else None)
    return out


def test_seed_preset_writes_the_whole_workdir(tmp_path, mnist_dir):
    workdir = tmp_path / "seed"
    result = train(workdir, "--preset", "seed", "--epochs", "1", "--max-steps", "4")
    assert result.returncode == 0, result.stderr
    assert "val_sequence_acc" in result.stdout and "done at step 4" in result.stdout
    config = json.loads((workdir / "config.json").read_text())
    assert config["preset"] == "seed" and config["image_size"] == [64, 64] and config["train_examples"] == 60000
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


def test_time_budget_stops_validated_and_saved(tmp_path, mnist_dir):
    workdir = tmp_path / "budget"
    result = train(workdir, "--max-digits", "1", "--time-budget", "0.4")  # 24 s: a few dozen of 2,340 steps
    assert result.returncode == 0, result.stderr
    assert "time budget of 0.4 min is spent" in result.stdout and "everything saved" in result.stdout
    (record,) = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert 0 < record["step"] < 2340 and 0 < record["epoch"] < 1 and "val_sequence_acc" in record
    assert str(record["step"]) in [p.name for p in (workdir / "checkpoints").iterdir()]
    assert (workdir / "model.h5").is_file()
    # The default recipe's cosine schedule is planned over its epochs: continuing under others is refused.
    other = train(workdir, "--max-digits", "1", "--epochs", "3")
    assert other.returncode == 2 and "holds a run trained with epochs=8" in other.stderr


def test_sigterm_then_rerun_ends_bit_identical(tmp_path, mnist_dir):
    steps = ["--max-steps", "16", "--checkpoint-every", "3"]
    straight = train(tmp_path / "straight", *steps)
    assert straight.returncode == 0, straight.stderr

    workdir = tmp_path / "interrupted"
    command = [sys.executable, "train.py", "--workdir", str(workdir), *QUICK, *steps]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not (workdir / "checkpoints" / "3").is_dir() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: saved step" in stderr and "Traceback" not in stderr
    stopped = max(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert 3 <= stopped < 16

    resumed = train(workdir, *steps)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {workdir} at step {stopped}" in resumed.stdout
    ours, theirs = weights(workdir / "model.h5"), weights(tmp_path / "straight" / "model.h5")
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)

    # The epoch's training figures cover the whole epoch, interrupted or not.
    def last(run: str) -> dict:
        return json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])

    for name in ("loss", "sequence_acc", "val_loss", "val_sequence_acc"):
        assert last("straight")[name] == last("interrupted")[name], name

    other = train(workdir, *steps, "--batch-size", "64")
    assert other.returncode == 2 and "holds a run trained with batch_size=128" in other.stderr


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


def test_two_devices_match_one(tmp_path, mnist_dir):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    two = train(tmp_path / "two", "--max-steps", "5", env=env)
    assert two.returncode == 0, two.stderr
    assert json.loads((tmp_path / "two" / "config.json").read_text())["devices"] == 2
    one = train(tmp_path / "one", "--max-steps", "5")
    assert one.returncode == 0, one.stderr
    a, b = weights(tmp_path / "one" / "model.h5"), weights(tmp_path / "two" / "model.h5")
    for name in a:
        # Adam divides by the gradient's own scale, so float noise in a near-zero gradient can move
        # a weight by up to lr per step: a handful may differ that much; a real error moves many.
        off = np.abs(a[name] - b[name])
        assert off.max() <= 5 * 1e-3 and np.mean(off > 1e-5) < 1e-3, name
    loss = [json.loads((tmp_path / d / "metrics.jsonl").read_text())["loss"] for d in ("one", "two")]
    assert loss[0] == pytest.approx(loss[1], rel=1e-5)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--epochs", "-1"], "--epochs: must be at least 1"),
        (["--preset", "big"], "invalid choice: 'big'"),
        (["--max-digits", "0"], "--max-digits: must be at least 1"),
        (["--learning-rate", "0"], "--learning-rate must be positive"),
        (["--train-examples", "100"], "cannot fill one batch of 128"),
        (["--preset", "default", "--image-size", "64x64"], "divides into 5 equal columns"),
        (["--time-budget", "0"], "--time-budget: must be a positive number of minutes"),
    ],
)
def test_bad_flags_get_one_line(tmp_path, monkeypatch, capsys, flags, message):
    # In-process, through the same entry point as the command (the command itself: test below).
    sys.path.insert(0, str(ROOT))
    import train as train_script
    from pipeline.flags import run

    monkeypatch.setattr(sys, "argv", ["train.py", "--workdir", str(tmp_path / "w"), *flags])
    with pytest.raises(SystemExit) as stop:
        run(train_script.main, "train.py")
    stderr = capsys.readouterr().err
    last = stderr.strip().splitlines()[-1]  # argparse's usage may come before: nothing else
    assert stop.value.code == 2 and last.startswith("train.py: error:") and message in last
    assert "Traceback" not in stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


def test_bad_flag_from_the_command_line(tmp_path):
    result = train(tmp_path / "w", "--batch-size", "0")
    assert result.returncode == 2 and "--batch-size: must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_folder_that_is_not_a_workdir_is_left_alone(tmp_path):
    (tmp_path / "model.h5").write_text("someone else's file")
    result = train(tmp_path)
    assert result.returncode == 2 and "holds no digitseq run" in result.stderr
    assert (tmp_path / "model.h5").read_text() == "someone else's file" and len(list(tmp_path.iterdir())) == 1
