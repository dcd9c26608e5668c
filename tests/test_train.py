"""train.py run for real on MNIST: the workdir it writes, exact resume, NaN stop, data parallel."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT

from model import keras_h5
from model.recipes import RECIPES

QUICK = ["--val-examples", "200"]


def train(workdir: Path, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "train.py", "--workdir", str(workdir), *QUICK, *flags]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)


def weights(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        f["model_weights"].visititems(lambda name, obj: out.update({name: obj[()]}) if hasattr(obj, "shape") else None)
    return out


@pytest.mark.slow
def test_seed_preset_writes_the_whole_workdir(tmp_path, mnist_dir):
    workdir = tmp_path / "seed"
    result = train(workdir, "--preset", "seed", "--epochs", "1", "--max-steps", "4")
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
    recipe = ["--max-digits", "2", "--batch-size", "32", "--checkpoint-every", "10"]
    straight = train(tmp_path / "straight", "--ensemble", "2", *recipe, "--max-steps", "24")
    assert straight.returncode == 0, straight.stderr
    assert "about " in straight.stdout and " for the 3 steps left (" in straight.stdout  # the estimate at step 21
    workdir = tmp_path / "resumed"
    assert train(workdir, "--ensemble", "2", *recipe, "--max-steps", "3").returncode == 0
    resumed = train(workdir, *recipe, "--max-steps", "24")  # without --ensemble: the run's recorded one
    assert resumed.returncode == 0 and f"resuming {workdir} at step 3" in resumed.stdout, resumed.stderr
    assert json.loads((workdir / "config.json").read_text())["ensemble"] == 2
    ours, theirs = weights(workdir / "model.h5"), weights(tmp_path / "straight" / "model.h5")
    assert ours.keys() == theirs.keys() and {"member_1_conv1", "member_2_conv1"} <= {k.split("/")[0] for k in ours}
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)
    kernels = [ours[f"member_{m}_conv1/member_{m}_conv1/kernel"] for m in (1, 2)]
    assert not np.array_equal(*kernels)  # each member its own initial weights


def start(workdir: Path, *flags: str) -> subprocess.Popen:
    command = [sys.executable, "train.py", "--workdir", str(workdir), *QUICK, *flags]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the moment came"
        time.sleep(0.001)


def steps_saved(workdir: Path) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


@pytest.mark.slow
def test_interrupted_every_way_then_rerun_ends_bit_identical(tmp_path, mnist_dir):
    steps = ["--max-digits", "2", "--batch-size", "32", "--max-steps", "16", "--checkpoint-every", "3"]
    straight = train(tmp_path / "straight", *steps)
    assert straight.returncode == 0, straight.stderr
    workdir = tmp_path / "interrupted"

    # A second run on the workdir is refused while the first holds it (frozen here, so that it is surely
    # still running), and the first goes on unharmed. Then SIGTERM mid-epoch: saved, exit 128+15.
    first = start(workdir, *steps)
    wait_for(lambda: (workdir / "checkpoints" / "3").is_dir(), first)
    first.send_signal(signal.SIGSTOP)
    second = train(workdir, *steps)
    assert second.returncode == 2, second.stderr
    assert f"{workdir} is in use by another train.py (pid {first.pid})" in second.stderr
    first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: saved step" in stderr and "Traceback" not in stderr
    stopped = steps_saved(workdir)[-1]
    assert 3 <= stopped < 15

    # kill -9 in the middle of a checkpoint save: frozen while orbax's temporary folder exists, then killed.
    killed = start(workdir, *steps[:6], "--checkpoint-every", "1")
    partials = workdir / "checkpoints"
    while True:
        wait_for(lambda: any(partials.glob("*.orbax-checkpoint-tmp*")), killed)
        killed.send_signal(signal.SIGSTOP)
        caught = [p.name for p in partials.glob("*.orbax-checkpoint-tmp*")]
        if caught:
            killed.kill()
            killed.communicate()
            break
        killed.send_signal(signal.SIGCONT)  # the save completed meanwhile: try the next one
    half_saved = int(caught[0].split(".")[0])
    assert half_saved not in steps_saved(workdir) and steps_saved(workdir)[-1] == half_saved - 1

    resumed = train(workdir, *steps)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {workdir} at step {half_saved - 1}" in resumed.stdout
    assert not list(partials.glob("*.orbax-checkpoint-tmp*"))  # the half-written save is cleaned up
    ours, theirs = weights(workdir / "model.h5"), weights(tmp_path / "straight" / "model.h5")
    assert ours.keys() == theirs.keys()
    assert all(np.array_equal(ours[name], theirs[name]) for name in ours)

    # The epoch's training figures cover the whole epoch, interrupted or not.
    def last(run: str) -> dict:
        return json.loads((tmp_path / run / "metrics.jsonl").read_text().splitlines()[-1])

    for name in ("loss", "sequence_acc", "val_loss", "val_sequence_acc"):
        assert last("straight")[name] == last("interrupted")[name], name


DISK_FULL = """
set -e
mount -t tmpfs -o size=40m tmpfs "$DISK"
"$PYTHON" train.py --workdir "$DISK/run" --max-steps 2 --checkpoint-every 1 --val-examples 100 > /dev/null 2>&1
free=$(df -k --output=avail "$DISK" | tail -1)
dd if=/dev/zero of="$DISK/filler" bs=1k count=$((free - 256)) 2> /dev/null  # room for the logs, not a checkpoint
set +e
"$PYTHON" train.py --workdir "$DISK/run" --max-steps 4 --checkpoint-every 1 --val-examples 100 \
  > /dev/null 2> "$OUT/stderr"
echo $? > "$OUT/status"
set -e
ls "$DISK/run/checkpoints" > "$OUT/listing"
"$PYTHON" -c "
import sys; from model.checkpoints import Checkpoints; from model import keras_h5
c = Checkpoints(sys.argv[1] + '/checkpoints'); c.restore(c.latest_step())
keras_h5.read(sys.argv[1] + '/model.h5'); print(c.latest_step())" "$DISK/run" > "$OUT/restored"
"""


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, mnist_dir):
    # A 40 MB filesystem of its own (tmpfs in a private mount namespace), filled up after two checkpoints.
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    env = dict(os.environ, DISK=str(disk), OUT=str(tmp_path), PYTHON=sys.executable)  # the tests' Python, venv or not
    run = subprocess.run(["unshare", "-rm", "bash", "-c", DISK_FULL], cwd=ROOT, env=env, timeout=900)
    assert run.returncode == 0
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "status").read_text().strip() == "1"
    # One line, and nothing after it (orbax's threads winding down once printed tracebacks there).
    assert stderr.strip().splitlines() == [
        f"train.py: saving step 3 in {disk}/run/checkpoints failed (no space left on the device); the checkpoint "
        "of step 2 is intact; once there is room, rerun the same command to continue"
    ]
    assert (tmp_path / "listing").read_text().split() == ["1", "2"]  # the half-written step 3 is removed
    assert (tmp_path / "restored").read_text().strip() == "2"


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(workdir: Path, *flags: str) -> None:
    """train.py as two jax.distributed processes on loopback, one CPU device each."""
    port = free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                "--workdir",
                str(workdir),
                *QUICK,
                *flags,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    assert "done at step" in outputs[0][0] and "done at step" not in outputs[1][0]  # process 0 speaks


@pytest.mark.slow
def test_two_processes_match_two_devices_in_one(tmp_path, mnist_dir):
    flags = ["--max-digits", "2", "--batch-size", "32", "--train-examples", "128", "--epochs", "2"]  # 4 steps an epoch
    two = train(tmp_path / "two", *flags, env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert two.returncode == 0, two.stderr
    # Two processes, stopped after epoch 1 and resumed: orbax saves and restores across both.
    two_processes(tmp_path / "procs", *flags, "--max-steps", "4")
    two_processes(tmp_path / "procs", *flags)
    config = json.loads((tmp_path / "procs" / "config.json").read_text())
    assert config["devices"] == 2 and config["processes"] == 2

    def curve(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(curve("procs")) == 2 and curve("procs") == pytest.approx(curve("two"), rel=1e-5)
    a, b = weights(tmp_path / "two" / "model.h5"), weights(tmp_path / "procs" / "model.h5")
    assert a.keys() == b.keys()
    for name in a:
        # Float noise only: sums in another order. Adam divides by the gradient's own scale, so noise in
        # a near-zero gradient can move a weight by up to lr per step: a handful may; a real error moves many.
        off = np.abs(a[name] - b[name])
        assert off.max() <= 8 * 3e-3 and np.mean(off > 1e-4 * np.maximum(1, np.abs(a[name]))) < 1e-3, name


def test_the_recipes_name_every_distortion_the_pipeline_draws():
    # model/ cannot import pipeline/, so the recipes spell the names out; config.json records them as
    # the recipe orders them, and resume compares them: the two lists must be the same, in order.
    from model.recipes import DISTORTIONS as NAMED
    from pipeline.distort import DISTORTIONS

    assert NAMED == DISTORTIONS and RECIPES["default"].distortions == DISTORTIONS


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-size", "0"], "--batch-size: must be at least 1"),
        (["--epochs", "-1"], "--epochs: must be at least 1"),
        (["--preset", "big"], "invalid choice: 'big'"),
        (["--max-digits", "0"], "--max-digits: must be at least 1"),
        (["--learning-rate", "0"], "--learning-rate must be positive"),
        (["--learning-rate", "inf"], "--learning-rate must be positive and finite, not inf"),
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
    """A config.json without a layout was written when every run trained on cells: rerunning its command
    continues it so, whatever today's default recipe says."""
    sys.path.insert(0, str(ROOT))
    import train as train_script

    config = {"preset": "default", "max_digits": 5, "ensemble": 1, "image_size": [28, 140], "layers": []}
    (tmp_path / "config.json").write_text(json.dumps(config))
    recipe, _ = train_script.config_from_args(train_script.parse_args(["--workdir", str(tmp_path)]))
    assert recipe.preset == "default" and recipe.layout == "cells"
    fresh, _ = train_script.config_from_args(train_script.parse_args(["--workdir", str(tmp_path / "new")]))
    assert fresh.layout == "mixed"
