"""train.py where the process is the subject: two jax.distributed processes of one run, a full disk
(a small tmpfs of its own), a mistake typed on the command line."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY, TINY_EPOCH, command, weights

DISK_FULL = """
set -e
mount -t tmpfs -o size=40m tmpfs "$DISK"
"$PYTHON" train.py --workdir "$DISK/run" --max-steps 2 --checkpoint-every 1 --val-examples 100 --distortions none \
  > /dev/null 2>&1
free=$(df -k --output=avail "$DISK" | tail -1)
dd if=/dev/zero of="$DISK/filler" bs=1k count=$((free - 256)) 2> /dev/null  # room for the logs, not a checkpoint
set +e
"$PYTHON" train.py --workdir "$DISK/run" --max-steps 4 --checkpoint-every 1 --val-examples 100 --distortions none \
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
    result = subprocess.run(["unshare", "-rm", "bash", "-c", DISK_FULL], cwd=ROOT, env=env, timeout=900)
    assert result.returncode == 0
    stderr = (tmp_path / "stderr").read_text()
    assert (tmp_path / "status").read_text().strip() == "1"
    # One line, and nothing after it (orbax's threads winding down once printed tracebacks there).
    assert stderr.strip().splitlines() == [
        f"train.py: saving step 3 in {disk}/run/checkpoints failed (no space left on the device); the checkpoint "
        "of step 2 is intact; once there is room, rerun the same command to continue"
    ]
    assert (tmp_path / "listing").read_text().split() == ["1", "2"]  # the half-written step 3 is removed
    assert (tmp_path / "restored").read_text().strip() == "2"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(workdir: Path, *flags: str) -> list[str]:
    """train.py as two jax.distributed processes on loopback, one CPU device each; their standard outputs."""
    port = free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "train.py",
                "--workdir",
                str(workdir),
                *TINY,
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
    return [stdout for stdout, _ in outputs]


@pytest.mark.slow
def test_two_processes_match_two_devices_in_one(tmp_path, mnist_dir):
    # One process with two devices trains the reference, a checkpoint at each epoch's end (steps 8 and 16).
    two = tmp_path / "two"
    result = command("train.py", "--workdir", str(two), *TINY, "--checkpoint-every", str(TINY_EPOCH),
                     env=dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2"))  # fmt: skip
    assert result.returncode == 0, result.stderr
    # Two processes continue a copy of it whose last checkpoint is lost: orbax restores across both from
    # epoch 1's, and they train epoch 2 and save across both.
    procs = tmp_path / "procs"
    shutil.copytree(two, procs)
    shutil.rmtree(procs / "checkpoints" / str(2 * TINY_EPOCH))
    outputs = two_processes(procs)
    assert f"resuming {procs} at step {TINY_EPOCH}" in outputs[0]
    config = json.loads((procs / "config.json").read_text())
    assert config["devices"] == 2 and config["processes"] == 2

    def curve(run: str) -> list[float]:
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    assert len(curve("procs")) == 2 and curve("procs") == pytest.approx(curve("two"), rel=1e-5)
    a, b = weights(two / "model.h5"), weights(procs / "model.h5")
    assert a.keys() == b.keys()
    for name in a:
        # Float noise only: sums in another order. Adam divides by the gradient's own scale, so noise in
        # a near-zero gradient can move a weight by up to lr per step: a handful may; a real error moves many.
        off = np.abs(a[name] - b[name])
        assert off.max() <= 8 * 3e-3 and np.mean(off > 1e-4 * np.maximum(1, np.abs(a[name]))) < 1e-3, name


def test_bad_flag_from_the_command_line(tmp_path):
    result = command("train.py", "--workdir", str(tmp_path / "w"), "--batch-size", "0")
    assert result.returncode == 2 and "--batch-size: must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


FULL_DISK_H5 = """
set -e
mount -t tmpfs -o size=4m tmpfs "$DISK"
"$PYTHON" - <<'EOF'
import errno, os, sys
from model import keras_h5, networks as nets
path = os.path.join(os.environ["DISK"], "model.h5")
small, big = nets.build(nets.DEFAULT, 1), nets.build(nets.SEED, 5)
keras_h5.write(path, small, (28, 28), nets.init_variables(small, (28, 28), 0), "default", step=1)
try:
    keras_h5.write(path, big, (64, 64), nets.init_variables(big, (64, 64), 0), "seed", step=2)
except OSError as error:
    print("ENOSPC" if error.errno == errno.ENOSPC else error)
print(keras_h5.recorded_step(path), sorted(os.listdir(os.environ["DISK"])))
EOF
"""


def test_a_full_disk_during_the_model_h5_write_keeps_the_previous_one(tmp_path):
    # The seed network's model.h5 (16 MB) does not fit on a 4 MB tmpfs: a plain OSError, no crash.
    if subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -rm (user and mount namespaces) to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    env = dict(os.environ, DISK=str(disk), PYTHON=sys.executable)  # the tests' own Python, venv or not
    result = subprocess.run(["unshare", "-rm", "bash", "-c", FULL_DISK_H5], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ENOSPC", "1 ['model.h5']"]
