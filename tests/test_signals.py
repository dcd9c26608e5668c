"""train.py as a process: Ctrl-C, SIGTERM, SIGHUP and kill -9 at the worst moments, a second train.py on
the same workdir; what it says (one line) and keeps (everything before), and an exact resume after."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, TINY_EPOCH, only_line, run, steps_saved, weights

from model import keras_h5
from model.checkpoints import Checkpoints
from model.workdir import Workdir


def start(workdir: Path, *flags: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    """train.py with the tiny recipe, in a process of its own, started (not waited for)."""
    command = [sys.executable, "train.py", "--workdir", str(workdir), *TINY, *flags]
    return subprocess.Popen(command, cwd=ROOT, stdout=stdout, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, seconds: float = 600) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before the moment came"
        time.sleep(0.001)


@pytest.mark.slow
def test_interrupted_every_way_then_rerun_ends_bit_identical(tmp_path, mnist_dir):
    straight = run("train.py", "--workdir", str(tmp_path / "straight"), *TINY, "--checkpoint-every", "3")
    assert straight.returncode == 0, straight.stderr
    workdir = tmp_path / "interrupted"

    # A second run on the workdir is refused while the first holds it (frozen here, so that it is surely
    # still running), and the first goes on unharmed. Then SIGTERM mid-epoch: saved, exit 128+15.
    first = start(workdir, "--checkpoint-every", "3")
    wait_for(lambda: (workdir / "checkpoints" / "3").is_dir(), first)
    first.send_signal(signal.SIGSTOP)
    second = run("train.py", "--workdir", str(workdir), *TINY, "--checkpoint-every", "3")
    assert second.returncode == 2, second.stderr
    assert f"{workdir} is in use by another train.py (pid {first.pid})" in second.stderr
    first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 128 + signal.SIGTERM, stderr
    assert "SIGTERM: saved step" in stderr and "Traceback" not in stderr
    stopped = steps_saved(workdir)[-1]
    assert 3 <= stopped < 15

    # kill -9 in the middle of a checkpoint save (frozen while orbax's temporary folder exists, then killed),
    # twice: the second run resumes from what the first kill left and is killed mid-save in its turn.
    partials = workdir / "checkpoints"
    for _ in range(2):
        left = set(partials.glob("*.orbax-checkpoint-tmp*"))  # the last kill's, removed once the run resumes
        killed = start(workdir, "--checkpoint-every", "1")
        while True:
            wait_for(lambda left=left: bool(set(partials.glob("*.orbax-checkpoint-tmp*")) - left), killed)
            killed.send_signal(signal.SIGSTOP)
            caught = [p.name for p in set(partials.glob("*.orbax-checkpoint-tmp*")) - left]
            if caught:
                killed.kill()
                killed.communicate()
                break
            killed.send_signal(signal.SIGCONT)  # the save completed meanwhile: try the next one
        half_saved = int(caught[0].split(".")[0])
        assert half_saved not in steps_saved(workdir) and steps_saved(workdir)[-1] == half_saved - 1

    resumed = run("train.py", "--workdir", str(workdir), *TINY, "--checkpoint-every", "3")
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


def test_ctrl_c_while_the_libraries_load_is_quiet(tmp_path):
    process = subprocess.Popen([sys.executable, "train.py", "--workdir", str(tmp_path / "w")], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    time.sleep(0.5)  # TensorFlow, JAX and orbax take seconds to import
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr


@pytest.mark.slow
def test_sigterm_while_finishing_the_last_epoch_is_said(tmp_path, mnist_dir):
    # The signal is sent while the last epoch's outputs are being written (its metrics line is there, the
    # process frozen so it cannot finish first): the run completes, says so, and exits 128+15.
    workdir = Workdir(tmp_path / "run")
    for _ in range(3):
        process = start(workdir.path, "--max-steps", str(TINY_EPOCH), "--no-resume")
        while process.poll() is None and not workdir.metrics_file.is_file():
            time.sleep(0.001)
        process.send_signal(signal.SIGSTOP)
        finished = process.poll() is not None
        process.send_signal(signal.SIGTERM)
        process.send_signal(signal.SIGCONT)
        _, stderr = process.communicate(timeout=300)
        if not finished:
            break
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert only_line(stderr) == f"train.py: SIGTERM while finishing: the run is complete and saved at step {TINY_EPOCH}"
    assert keras_h5.recorded_step(workdir.model) == TINY_EPOCH


@pytest.mark.slow
def test_a_live_workdir_is_read_every_time_while_its_training_removes_checkpoints(tmp_path, mnist_dir, capfd):
    """eval.py and predict.py read a workdir whose training saves a checkpoint every step and removes the
    old ones meanwhile: every load takes the newest whole checkpoint, and nothing is said of the others.
    Then the terminal that started the run closes (SIGHUP): it saves, says so in one line and exits 128+1."""
    from model import trained

    workdir = Workdir(tmp_path / "run")
    process = start(workdir.path, "--epochs", "40", "--checkpoint-every", "1", stdout=subprocess.DEVNULL)
    try:
        while process.poll() is None and not (workdir.checkpoints / "3").is_dir():
            time.sleep(0.001)
        loads, failures = 0, []
        while process.poll() is None and loads < 60:
            try:
                trained.from_workdir(workdir.path)
                loads += 1
            except Exception as error:  # what a user would see as a traceback
                failures.append(f"{type(error).__name__}: {error}")
    finally:
        process.send_signal(signal.SIGHUP)
        _, stderr = process.communicate(timeout=300)
    assert loads >= 20 and not failures, failures
    assert capfd.readouterr().err == ""
    assert process.returncode == 128 + signal.SIGHUP, stderr
    step = Checkpoints(workdir.checkpoints).latest_step()
    assert only_line(stderr) == (
        f"train.py: SIGHUP: saved step {step} in {workdir.checkpoints}; rerun the same command to continue"
    )


def test_a_crash_is_said_in_one_line_and_what_each_thread_did_is_kept(tmp_path, mnist_dir):
    """A fatal signal (here SIGSEGV, as a C++ library's bad read would raise): one line on stderr naming
    the report, the report in the workdir, and the workdir still the run's own (a rerun continues it)."""
    workdir = Workdir(tmp_path / "run")
    process = start(workdir.path, "--epochs", "40")
    wait_for(workdir.metrics_file.is_file, process)
    process.send_signal(signal.SIGSEGV)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == -signal.SIGSEGV
    assert only_line(stderr) == (
        f"train.py: crashed (Segmentation fault); what each thread was doing is in {workdir.crash_file}"
    )
    report = workdir.crash_file.read_text()
    assert report.startswith("Fatal Python error: Segmentation fault") and 'train.py", line' in report
    early = Workdir(tmp_path / "early")  # a crash before the run's first file: the folder is still train.py's
    early.path.mkdir()
    early.crash_file.write_text(report)
    assert not early.is_foreign()
